"""PyTorch: eager (the reference) and torch.compile, on the CPU or a CUDA GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ... import modeldir
from ...core.errors import VaeEngineError, missing_dependency
from .base import BackendDefaults, BackendSpec, PathSpec, tensor, unsupported


class TorchBackend(BackendDefaults):
    """PyTorch eager (the reference), or torch.compile'd encoder and decoder; fp32, bf16 (CPUs with AVX512_BF16 or
    AMX and GPUs; emulated, slowly, elsewhere) or fp16 (GPU). Inputs and outputs stay float32."""

    def __init__(self, model_dir: Path, compile: bool = False, device: str = "cpu", threads: int | None = None,
                 precision: str = "fp32"):
        try:
            import torch
        except ImportError as exc:
            raise (missing_dependency(exc, f"--backend {'torch-compile' if compile else 'torch'}") or exc) from None

        if threads:
            torch.set_num_threads(threads)
        self.name = "torch-compile" if compile else "torch"
        if device == "cuda" and not torch.cuda.is_available():
            raise VaeEngineError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16", "fp16") or (precision == "fp16" and self.device.type != "cuda"):
            raise unsupported(self.name, precision, "torch runs fp32 and bf16 (and fp16 on a GPU); int8 is "
                               "--backend onnxruntime's (export --quantize int8)")
        self.precision, self.provider = precision, self.device.type
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = modeldir.load_model(model_dir).to(self.device, self.dtype)
        self.encoder, self.decoder, self.likelihood = model.encoder, model.decoder, model.likelihood
        # on a GPU the IWAE log-weights are computed where the decoder's outputs are (`log_weights`), from eps made
        # there too (`rng.normal_eps_torch`): copying K x D parameters per item to the host, or K x L eps to the
        # device, would cost more than the network itself
        self.score_rows = 1 << 20 if self.device.type == "cuda" else None
        self._mixture = None  # (the engine's mixture prior, its components on the device), moved on first use
        if compile:  # dynamic batch axis, so a new batch size does not recompile
            self.encoder = torch.compile(self.encoder, dynamic=True)
            self.decoder = torch.compile(self.decoder, dynamic=True)

    def _run(self, net, a: np.ndarray) -> np.ndarray:
        """`net` on `a`, its output(s) back as one float32 host array: one copy to the device and one back (a
        tuple is stacked on the device first), and no explicit synchronization (the copy back waits)."""
        import torch

        with torch.inference_mode():
            out = net(tensor(a).to(self.device, self.dtype))
            if isinstance(out, tuple):
                out = torch.stack(out)
            return out.float().cpu().numpy()

    def encode(self, x):
        mu, logvar = self._run(self.encoder, x)
        return mu, logvar

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """E[x|z] at each input's posterior mean, the networks in one call: mu stays on the device (the same
        numbers as `decode(encode(x)[0])`: mu at the network's precision is exact in float32 and back); the mean
        is the likelihood's NumPy form, the one every path shares."""
        return self.likelihood.mean(self._run(lambda t: self.decoder(self.encoder(t)[0].to(self.dtype)), x))

    def raw_call(self, op: str, a: np.ndarray):
        """The network alone on `a` (already a tensor on the device): see `RAW_CALL`."""
        import torch

        t = tensor(a).to(self.device, self.dtype)
        net = {"encode": lambda: self.encoder(t)[0], "decode": lambda: self.decoder(t),
               "reconstruct": lambda: self.decoder(self.encoder(t)[0].to(self.dtype))}[op]

        def call():
            with torch.inference_mode():
                out = net()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            return out
        return call

    def decode(self, z):
        return self._run(self.decoder, z)

    def log_weights(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, eps, prior=None) -> np.ndarray:
        """IWAE log-weights (b, K) float64 for eps (b, K, L) (a NumPy array, or a tensor already on the device), on
        the backend's device: the network at its precision, the reparameterization and every log-density in fp32
        (the twin of `kernels.log_weights`). `prior`: the engine's prior (`priors.NormalPrior` or `MixturePrior`;
        None is N(0, I)); a mixture's log-density runs here too, as the model's own `priors.mixture_log_prob`."""
        import torch

        from ...model.estimators import log_weight
        from ...model.posterior import DiagonalGaussian

        with torch.inference_mode():
            x_t, mu_t, lv_t, eps_t = (a.to(self.device) if isinstance(a, torch.Tensor) else tensor(a).to(self.device)
                                      for a in (x, mu, logvar, eps))
            q = DiagonalGaussian(mu_t, lv_t)
            z = q.sample(eps_t)  # (b, K, L), the kernels' eps layout
            params = self.decoder(z.reshape(-1, z.shape[-1]).to(self.dtype)).float().reshape(*z.shape[:2], -1)
            log_w = log_weight(self.likelihood, self._prior_log_prob(prior), x_t[:, None], params, z, q)
            return log_w.double().cpu().numpy()

    def _prior_log_prob(self, prior):
        """log p(z) as a function of device tensors: N(0, I), or the mixture's components moved here once."""
        from ...model.posterior import standard_normal_log_prob
        from ...model.priors import mixture_log_prob

        if prior is None or prior.standard:
            return standard_normal_log_prob
        if self._mixture is None or self._mixture[0] is not prior:
            self._mixture = (prior, tensor(prior.mu).to(self.device), tensor(prior.logvar).to(self.device))
        _, mu_c, logvar_c = self._mixture
        return lambda z: mixture_log_prob(z, mu_c, logvar_c)


def _open(compile: bool):
    def open_(model_dir: Path, cfg, precision: str, threads: int | None, device: str, spin: bool) -> TorchBackend:
        return TorchBackend(model_dir, compile=compile, device=device, threads=threads, precision=precision)
    return open_


def _torch_missing(precision: str, device: str, model_dir: Path | None) -> str | None:
    from ...core import hardware

    return None if hardware.installed("torch") else "PyTorch is not installed (pip install 'vae-engine[train]')"


def _compiler_missing(precision: str, device: str, model_dir: Path | None) -> str | None:
    if _torch_missing(precision, device, model_dir):
        return _torch_missing(precision, device, model_dir)
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++")):
        return "torch.compile needs a C/C++ compiler on PATH (apt-get install gcc g++)"
    return None


SPECS = (
    BackendSpec("torch", (PathSpec("fp32", "cpu", "torch"), PathSpec("bf16", "cpu", "torch-bf16"),
                          PathSpec("fp32", "cuda", "torch-cuda"), PathSpec("bf16", "cuda", "torch-cuda-bf16"),
                          PathSpec("fp16", "cuda", "torch-cuda-fp16")), _open(False), _torch_missing),
    BackendSpec("torch-compile", (PathSpec("fp32", "cpu", "torch-compile"),), _open(True), _compiler_missing),
)
