"""What every backend shares: the interface (`Backend`), the registry entry a backend module declares
(`BackendSpec`), the checks of an ONNX graph's outputs (`GraphBackend`), and the one thread policy."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ...core import hardware, onnxwire
from ...core.config import CHUNK_ROWS, ModelConfig
from ...core.errors import ModelDirError, VaeEngineError, first_line
from ...modeldir import graphs

PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # what the numbers inside the networks are; I/O is always fp32
EXPORT_FLAG = {"fp32": "", "optimized": " --optimize", "int8": " --quantize int8", "fp16": " --fp16"}


class Backend(Protocol):
    """What every backend provides (`BackendDefaults` gives the optional parts to a backend that has no better
    way): the engine calls these, never probes for them."""

    name: str
    precision: str
    provider: str
    # decoder rows per block of an IWAE estimate computed on the device by `log_weights(x, mu, logvar, eps,
    # prior)` (a GPU keeps its decoder's outputs there); None: the engine's kernels compute it on the host
    score_rows: int | None

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, D) float32 raw features -> (mu, logvar), each (B, L) float32."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (B, L) float32 -> the likelihood's parameters (B, P*D) float32."""

    def decode_mean(self, z: np.ndarray) -> np.ndarray:
        """z (B, L) float32 -> E[x|z] (B, D) float32."""

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """x (B, D) float32 -> E[x|z] at each input's posterior mean (B, D) float32."""

    def raw_call(self, op: str, a: np.ndarray):
        """The runtime alone on `a` for `vae-engine bench` (`RAW_CALL`)."""


class BackendDefaults:
    """The optional parts of `Backend`, for a backend without a better way: E[x|z] as the likelihood's NumPy mean
    of the decoder's parameters, reconstruct as encode then that mean, IWAE log-weights on the host."""

    score_rows: int | None = None

    def decode_mean(self, z: np.ndarray) -> np.ndarray:
        return self.likelihood.mean(self.decode(z))

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.decode_mean(self.encode(x)[0])


@dataclass(frozen=True)
class PathSpec:
    """One (precision, device) a backend runs; `label` names it in `vae-engine bench` (None: not benchmarked)."""

    precision: str
    device: str = "cpu"
    label: str | None = None


@dataclass(frozen=True)
class BackendSpec:
    """A backend's registry entry: its name, the paths it implements, how to open one, and what this machine
    lacks for a path (None when nothing; the registry checks the generic facts, e.g. a CUDA GPU, itself)."""

    name: str
    paths: tuple[PathSpec, ...]
    open: Callable[..., Backend]  # (model_dir, cfg, precision, threads, device, spin) -> Backend
    missing: Callable[[str, str, Path | None], str | None] = lambda precision, device, model_dir: None


def unsupported(backend: str, precision: str, why: str) -> VaeEngineError:
    return VaeEngineError(f"--backend {backend} cannot run --precision {precision}: {why}")


def tensor(a: np.ndarray):
    """A torch view of a NumPy array; read-only memory (a memory-mapped .npy, a request's bytes) is copied, since
    torch cannot mark a tensor read-only and warns instead."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())


FUSED_MAX_ROWS = 64  # reconstruct calls of up to this many rows run the fused encoder+decoder graph


class GraphBackend(BackendDefaults):
    """What the ONNX-graph backends share: the specs, and checking every output before the kernels see it."""

    name = "graph"

    def __init__(self, cfg: ModelConfig):
        from ...model import likelihoods

        self.latent_dim, self.out_dim = cfg.latent_dim, graphs.spec("decoder", cfg).outputs[0][1]
        self.chunk_rows = cfg.chunk_rows
        self.likelihood, self.mean_width = likelihoods.get(cfg.likelihood), cfg.input_dim
        self.paths: dict[str, Path] = {}
        self.graphs: dict[str, graphs.Graph] = {}  # role -> the checked graph
        self.open_roles: set[str] = set()  # the encoder and decoder, once opened (`_opened`)
        self.ends_in_mean: dict[str, bool] = {}  # for each mean graph made: does it end in E[x|z] itself?

    def _open(self, role: str, graph: graphs.Graph) -> None:
        """Make a checked graph runnable as `role` in this backend's runtime."""
        raise NotImplementedError

    def _opened(self, role: str) -> None:
        """Open the encoder or decoder on its first use: a job runs one of them (encode; decode and sample), so
        the other's session is never made (10-15 ms each on the 2-core machines). Both were checked at load."""
        if role not in self.open_roles:
            self._open(role, self.graphs[role])
            self.open_roles.add(role)

    @staticmethod
    def _graph(model_dir: Path, role: str, variant: str) -> Path:
        path = graphs.graph_path(model_dir, role, variant)
        if not path.is_file():
            raise VaeEngineError(f"{path} not found: run `vae-engine export {model_dir}{EXPORT_FLAG[variant]}` first")
        return path

    chunk_rows: int | None = CHUNK_ROWS  # calls of more rows run in chunks of this many (None: in one call);
    #                                      `ModelConfig.chunk_rows` for the model's item size

    def _infer(self, role: str, a: np.ndarray, out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """The graph's outputs for one input array, written into `out` (arrays of the right shape) when given
        (raises whatever the runtime raises)."""
        raise NotImplementedError

    def _run(self, role: str, a: np.ndarray, features: tuple[int, ...]) -> list[np.ndarray]:
        """Run one graph and check what it returns: the Numba kernels downstream trust these shapes. More than
        `chunk_rows` rows run chunk by chunk into one output (`config.CHUNK_ROWS`: the chunk's activations stay
        in cache), the first chunk checked, the others written in place, where a wrong shape cannot fit."""
        rows, a = self.chunk_rows, np.ascontiguousarray(a)  # runtimes share C-ordered memory (and so its chunks)
        if role in self.graphs:
            self._opened(role)
        try:
            if not rows or len(a) <= rows:
                outs = self._infer(role, a)
            else:
                first = self._run(role, a[:rows], features)
                outs = [np.empty((len(a), width), np.float32) for width in features]
                for out, part in zip(outs, first, strict=True):
                    out[:rows] = part
                for i in range(rows, len(a), rows):
                    self._infer(role, a[i:i + rows], [out[i:i + rows] for out in outs])
        except ModelDirError:
            raise
        except Exception as exc:  # a graph that loaded but cannot run (crafted shapes, unsupported ops)
            first = first_line(exc)
            raise ModelDirError(f"{self.paths[role]}: {self.name} failed to run it ({first[:300]})") from None
        for out, width in zip(outs, features, strict=True):
            if out.shape != (a.shape[0], width) or out.dtype != np.float32:
                raise ModelDirError(f"{self.paths[role]}: returned {out.dtype} {out.shape} where the model needs "
                                    f"float32 ({a.shape[0]}, {width}); re-export the model")
        return outs

    def encode(self, x):
        mu, logvar = self._run("encoder", x, (self.latent_dim, self.latent_dim))
        return mu, logvar

    def decode(self, z):
        return self._run("decoder", z, (self.out_dim,))[0]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """E[x|z] at the posterior mean, x (B, D) -> (B, D). Up to FUSED_MAX_ROWS rows in one runtime call: the two
        checked graphs merged (the encoder's mu feeding the decoder's z), ending in the likelihood's mean
        (`_mean_graph`); one call instead of two, and no NumPy pass after it, is what batch-1 latency needs (the
        runtime's fixed cost per call is most of the time there). Larger calls run the encoder, then the decoder's
        mean graph: the same arithmetic, where a call's fixed cost is negligible, and no onnx import for merging."""
        if len(x) > FUSED_MAX_ROWS or (self.chunk_rows or FUSED_MAX_ROWS) < FUSED_MAX_ROWS:
            # large calls, and items so large that a call holds fewer rows (an imported image autoencoder: merging
            # its two graphs would cost seconds and gigabytes for a fixed cost lost in its convolutions)
            return self.decode_mean(self.encode(x)[0])
        return self._mean_call("reconstruct", x)

    def decode_mean(self, z: np.ndarray) -> np.ndarray:
        """E[x|z] (B, D) in one call: the decoder graph ending in the likelihood's mean (`_mean_graph`)."""
        return self._mean_call("decode-mean", z)

    def _raw_role(self, op: str, a: np.ndarray) -> str:
        """The graph a raw call of `op` runs (see `RAW_CALL`): the fused one for reconstruct, made here on first use."""
        role = {"encode": "encoder", "decode": "decoder", "reconstruct": "reconstruct"}[op]
        if role == "reconstruct":
            self._mean_call(role, a[:1])  # the fused graph, opened
        else:
            self._opened(role)
        return role

    def _mean_call(self, role: str, a: np.ndarray) -> np.ndarray:
        if role not in self.ends_in_mean:
            self._open(role, self._mean_graph(role))
        if self.ends_in_mean[role]:
            return self._run(role, a, (self.mean_width,))[0]
        return self.likelihood.mean(self._run(role, a, (self.out_dim,))[0])

    def _mean_graph(self, role: str) -> graphs.Graph:
        """`role`'s graph, made on first use: the decoder (after the encoder for "reconstruct") with the
        likelihood's `mean_onnx` appended, or, for a likelihood without one, its parameters (`mean` follows in
        NumPy). A graph of its own, not a second output of the decoder's: ONNX Runtime runs every node of a graph
        whatever outputs are asked for, so the IWAE blocks would pay for a mean they never read. The mean is
        spliced in the wire format (a decode or sample job imports no onnx); only merging the encoder and decoder
        for reconstruct takes onnx.compose."""
        decoder = self.graphs["decoder"]
        params = decoder.outputs[0][0]
        data = decoder.data
        if role == "reconstruct":  # merged by onnx, the decoder's names prefixed
            from onnx import compose

            enc, dec = self.graphs["encoder"].proto(), compose.add_prefix(decoder.proto(), "decoder/")
            for m in (enc, dec):
                del m.metadata_props[:]  # the graphs' own metadata differ (role); the fused one needs none
            params = dec.graph.output[0].name
            data = compose.merge_models(enc, dec, io_map=[("mu", "decoder/z")], outputs=[params]).SerializeToString()
        nodes = self.likelihood.mean_onnx(params, "mean", self.mean_width)
        if nodes:  # spliced in the wire format
            data = onnxwire.append_to_graph(data, nodes, [onnxwire.output("mean", ("batch", self.mean_width))],
                                            f"{role} graph")
        self.paths[role], self.ends_in_mean[role] = self.paths["decoder"], bool(nodes)
        return graphs.inspect(data, Path(f"{role} graph"))


RAW_CALL = """Every backend's `raw_call(op, a)` returns a zero-argument callable that runs the runtime alone on the
prepared input `a` for op "encode", "decode" or "reconstruct" and returns the runtime's first output in the
runtime's own type (mu; the decoder's parameters; for reconstruct what the backend's one call computes, E[x|z]
where the likelihood's mean is inside the graph): no input rule, no output checks, conversions or copies, and the
runtime's public call (ONNX Runtime: `InferenceSession.run`), as a user of the runtime alone would make it.
`vae-engine bench` times it beside the engine's own call to report the engine's per-call overhead."""


def set_threads(threads: int | None) -> int:
    """Set torch and Numba thread counts (ORT takes its own per session); return the count used."""
    from ...core import fastmath
    from ...core.config import MAX_THREADS, check_int

    threads = hardware.available_cpus() if threads is None else check_int("threads", threads, 1, MAX_THREADS)
    if "torch" in sys.modules:  # torch backends set it too; a pure ONNX Runtime job never imports torch
        sys.modules["torch"].set_num_threads(threads)
    fastmath.set_threads(threads)  # now, or when Numba loads: a job without kernels never loads it
    return threads
