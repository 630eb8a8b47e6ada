"""What every likelihood provides."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.config import DECODER_OUTPUTS


def row_kernel(row):
    """Declare a likelihood's row function: callable from Numba kernels, where it is inlined (and compiled with the
    kernel's own flags). A plain function rather than a dispatcher, so the kernels built around it (`kernels`:
    one per likelihood, the row in their closure) keep one on-disk cache entry: Numba keys a closure's cache on
    the pickled closure, a function pickles by name, and a dispatcher would pickle with an id new in every process
    (each `score` or `evaluate` recompiled its log-weights kernel, about 2 s)."""
    from ...core.fastmath import inline

    return inline(row)


class Likelihood:
    """A decoder distribution p(x|z) over D features, parameterized by `n_params` values per feature."""

    name: str = ""
    n_params: int = 1  # decoder outputs per feature
    output_name: str = "params"  # the decoder graph's output
    unit_interval: bool = False  # data must lie in [0, 1]
    binarized: bool = False  # [0, 1] data is dynamically binarized (re-sampled Bernoulli pixels) for this one
    row: Any = None  # `row_kernel`: row(x (D,) float32, params (n_params*D,) float32) -> float32 log p(x|params)

    def __init_subclass__(cls, **kwargs):
        """What a subclass's name and row imply: its decoder output and parameter count (config.DECODER_OUTPUTS,
        shared with the graph specs), and its row kept a plain function (not bound as a method: the kernels call
        it with (x, params))."""
        super().__init_subclass__(**kwargs)
        cls.output_name, cls.n_params = DECODER_OUTPUTS[cls.name]
        if callable(cls.__dict__.get("row")):
            cls.row = staticmethod(cls.row)

    def binarizes(self, mode: str) -> bool:
        """Does this model see its [0, 1] data as dynamically binarized pixels, under a TrainConfig's `binarize`
        mode? The one answer for training, evaluation, export's checks and tuning's validation items."""
        return self.binarized and mode == "dynamic"

    def log_prob(self, x, params):
        """PyTorch: log p(x|params) summed over features; x (B, D) broadcasts against params (..., B, P*D)."""
        raise NotImplementedError

    def log_prob_numpy(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """NumPy twin of `log_prob`, in float64 (the reference the kernel and the PyTorch form are tested on)."""
        raise NotImplementedError

    def mean_torch(self, params):
        """PyTorch: E[x|z] (..., D), what reconstructions and samples show."""
        raise NotImplementedError

    def mean(self, params: np.ndarray) -> np.ndarray:
        """NumPy: E[x|z] (..., D) float32."""
        raise NotImplementedError

    def mean_onnx(self, params: str, out: str, dim: int) -> list | None:
        """ONNX: nodes (`onnxwire.node` bytes) appending E[x|z] as tensor `out` (B, D) to a graph whose tensor
        `params` holds the parameters (B, n_params * D), so a backend that runs graphs does the mean inside its
        one call (batch-1 latency); None where a float32 graph cannot match `mean` (the twin the tests compare
        it with)."""
        return None

    def sample(self, params: np.ndarray, seed: int = 0, start: int = 0) -> np.ndarray:
        """NumPy: x ~ p(x|params) (B, D) float32, row b from the counter streams of item start+b of seed."""
        raise NotImplementedError
