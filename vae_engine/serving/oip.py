"""The Open Inference Protocol (KServe v2), independent of the transport: the model table, tensor decoding and
encoding (JSON data and the binary tensor data extension), and `infer`, which runs a request through the server's
own input rule and micro-batcher, so answers equal /v1's and the offline jobs'.

A model folder NAME is served as one v2 model per operation: NAME-encode, NAME-decode, NAME-reconstruct,
NAME-sample, NAME-score and (with a detector.json) NAME-detect, each at version "1". The first dimension of every
tensor is the batch (-1 in the metadata). Request parameters: each operation's from `OPERATIONS` (the one
declaration /v1 uses too): `seed`, `start` (sample, score), `k` and `binarize` (score). `server.py` maps this onto
HTTP (/v2/...), `oip_grpc.py` onto gRPC.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.config import SEED_MAX

VERSION = "1"
PLATFORM = "vae-engine"
HEADER = "inference-header-content-length"  # the binary tensor data extension's header (case-insensitive)
EXTENSIONS = ("binary_tensor_data", "model_repository")

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(t): name for name, t in DATATYPES.items()}
NUMERIC = frozenset(DATATYPES)  # items: anything the input rule takes (UINT8 is intensity / 255, as in /v1)
FLOATS = frozenset({"FP16", "FP32", "FP64"})
INTEGERS = frozenset(n for n in DATATYPES if "INT" in n)
_LITTLE_ENDIAN = {name: np.dtype(t).newbyteorder("<") for name, t in DATATYPES.items()}

# request parameters that belong to the protocol or a client library, not to an operation: accepted and ignored
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority", "sequence_id", "sequence_start",
                                 "sequence_end", "headers", "content_type"})


@dataclass(frozen=True)
class Parameter:
    """A request option of an operation (/v1 JSON field or query parameter, v2 request parameter)."""

    kind: type  # int or bool
    default: int | bool
    doc: str
    lo: int = 0
    hi: int | str = 0  # the largest value, or the name of the server's Limits field that bounds it


# Every operation's request, declared once: the /v1 checks and OpenAPI bodies and the v2 model table read it.
PARAMETERS = {
    "seed": Parameter(int, 0, "seed of every random draw", 0, SEED_MAX),
    "start": Parameter(int, 0, "index of the first item's (or sample's) random stream", 0, 2**40),
    "n": Parameter(int, 1, "number of samples", 1, "max_items"),
    "k": Parameter(int, 1, "1: -ELBO; more: the IWAE negative log-likelihood with k importance samples", 1, "max_k"),
    "binarize": Parameter(bool, True, "binarize a Bernoulli model's inputs first, as evaluate does"),
}
ITEMS_DOC = "list of items, each a list (or nested lists) of numbers in the model's input shape"
OPERATIONS = {  # op -> (its array in /v1 bodies and its doc, the parameters it reads, summary)
    "encode": ("items", ITEMS_DOC, (), "Posterior mean and log-variance of each item"),
    "decode": ("z", "list of latent vectors (latent_dim numbers each)", (), "E[x|z] of each latent"),
    "reconstruct": ("items", ITEMS_DOC, (), "Decode each item's posterior mean"),
    "sample": (None, "", ("n", "seed", "start"), "n samples from the prior, keyed by seed"),
    "score": ("items", ITEMS_DOC, ("k", "seed", "start", "binarize"),
              "-ELBO (k=1) or IWAE negative log-likelihood per item, nats"),
    "detect": ("items", ITEMS_DOC, (), "Anomaly scores and flags (+1/-1) with the stored threshold"),
}


class RequestError(Exception):
    """A request the server refuses (/v1 and v2 alike): HTTP status (oip_grpc maps it to a gRPC code), one line."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # what the metadata declares (and the datatype of outputs)
    shape: tuple[int, ...]  # -1: any size (the batch)
    accepts: frozenset = frozenset()  # input datatypes taken (converted by the input rule)
    source: str = ""  # an output's key in the server's answer (App.run_batch), when it is not `name`

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    op: str  # the server operation it runs (App.prepare / App.run_batch)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[str, ...]  # request parameters the operation reads

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION], "platform": PLATFORM,
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}


def model_specs(name: str, input_shape: tuple[int, ...], latent_shape: tuple[int, ...], detector: bool,
                scores: bool = True) -> dict[str, ModelSpec]:
    """The v2 models of one model folder, by name: latents in the model's latent shape ((L,), or (C, h, w) for an
    imported autoencoder); sample and score only where the model can be scored (`scores`), detect only with a
    stored detector."""
    items = TensorSpec("items", "FP32", (-1, *input_shape), NUMERIC)
    z = TensorSpec("z", "FP32", (-1, *latent_shape), FLOATS)
    out_items = TensorSpec("items", "FP32", (-1, *input_shape))
    tensors = {  # op -> (inputs, outputs); its parameters are OPERATIONS' (v2 sends sample's n as a tensor)
        "encode": ((items,), (TensorSpec("mu", "FP32", (-1, *latent_shape)),
                              TensorSpec("logvar", "FP32", (-1, *latent_shape)))),
        "decode": ((z,), (out_items,)),
        "reconstruct": ((items,), (TensorSpec("reconstruction", "FP32", (-1, *input_shape), source="items"),)),
        "sample": ((TensorSpec("n", "INT64", (1,), INTEGERS),), (out_items,)),
        "score": ((items,), (TensorSpec("scores", "FP64", (-1,)),)),
        "detect": ((items,), (TensorSpec("scores", "FP64", (-1,)), TensorSpec("flags", "INT64", (-1,)))),
    }
    ops = [op for op in OPERATIONS if (op != "detect" or detector) and (op not in ("sample", "score") or scores)]
    return {f"{name}-{op}": ModelSpec(f"{name}-{op}", op, *tensors[op],
                                      tuple(p for p in OPERATIONS[op][2] if p != "n")) for op in ops}


# ---- the HTTP/REST body: a JSON header, then (binary tensor data extension) raw tensors in order ----

def decompress(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip/deflate request body (Content-Encoding), inflated to at most `limit` bytes (no zip bombs)."""
    if not encoding or encoding == "identity":
        return raw
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {encoding!r}: send gzip, deflate or an uncompressed body")
    inflate = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflate.decompress(raw, limit + 1)
    except zlib.error:
        raise RequestError(400, f"body is not valid {encoding} data") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise RequestError(413, f"inflated request body over {limit} bytes")
    return out


def split_body(raw: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON header, the binary part) of a request body."""
    if header_length is None:
        n = len(raw)
    elif not header_length.strip().isdigit() or int(header_length) > len(raw):
        raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                 f"{len(raw)}-byte body")
    else:
        n = int(header_length)
    try:
        header = _loads(bytes(raw[:n])) if n else None
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "request header is not valid JSON") from None
    if not isinstance(header, dict):
        raise RequestError(400, "request must be a JSON object with 'inputs'")
    return header, memoryview(raw)[n:]


def check_header(name: str, datatype: Any, shape: Any) -> tuple[int, ...]:
    """An input tensor's datatype and shape (REST or gRPC), checked -> the shape as a tuple."""
    if datatype not in DATATYPES:
        raise RequestError(400, f"input {name!r}: datatype {datatype!r} is not supported; send one of "
                                f"{', '.join(DATATYPES)}")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
        raise RequestError(400, f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def output_names(spec: ModelSpec, wanted: dict | None) -> list[str]:
    """The outputs a response carries: those the request names, else all of the model's."""
    return list(wanted) if wanted is not None else [t.name for t in spec.outputs]


def to_bytes(a: np.ndarray) -> bytes:
    """An output tensor as raw little-endian row-major bytes (binary extension, gRPC raw contents)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def tensor_from_json(t: Any, binary: memoryview, offset: int) -> tuple[str, str, np.ndarray, int]:
    """One entry of 'inputs' -> (name, datatype, array, offset after its binary data)."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise RequestError(400, "each input must be an object with 'name', 'shape', 'datatype' and data")
    name, datatype = t["name"], t.get("datatype")
    shape = check_header(name, datatype, t.get("shape"))
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None and "data" in t:  # which one would be the input? refused, not guessed
        raise RequestError(400, f"input {name!r} carries both 'data' and parameters.binary_data_size; send one")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise RequestError(400, f"input {name!r}: binary_data_size {size!r} is not a length within the "
                                     f"{len(binary) - offset} binary bytes left in the body")
        return name, datatype, from_bytes(binary[offset:offset + size], name, datatype, shape), offset + size
    if "data" not in t:
        raise RequestError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    return name, datatype, from_values(t["data"], name, datatype, shape), offset


def from_bytes(buf, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw little-endian row-major tensor bytes (binary extension, gRPC raw contents) -> an array of `shape`."""
    dtype, count = _LITTLE_ENDIAN[datatype], math.prod(shape)  # exact Python ints: no NumPy call per request
    if len(buf) != count * dtype.itemsize:
        raise RequestError(400, f"input {name!r}: {len(buf)} bytes for shape {list(shape)} {datatype} "
                                f"({count * dtype.itemsize} expected)")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def from_values(values: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Numbers given as values (JSON 'data', gRPC contents) -> an array of `shape`; floats are kept as float64
    (the input rule rounds them once), integers must be integers in the datatype's range."""
    bad = RequestError(400, f"input {name!r}: 'data' must be a (flat or nested) list of {datatype} numbers")
    try:
        raw = np.asarray(values)
    except (ValueError, TypeError):
        raise bad from None
    if raw.dtype.kind not in "biuf" or (datatype not in FLOATS and raw.dtype.kind == "f" and raw.size):
        raise bad
    count = math.prod(shape)
    if raw.size != count:
        raise RequestError(400, f"input {name!r}: {raw.size} values for shape {list(shape)} ({count} expected)")
    a = raw.astype(np.float64 if datatype in FLOATS else DATATYPES[datatype])
    if datatype not in FLOATS and raw.size and not np.array_equal(a, raw):
        raise RequestError(400, f"input {name!r}: values outside the range of {datatype}")
    return a.reshape(shape)


def parse_http(header: dict, binary: memoryview) -> tuple[dict[str, tuple[str, np.ndarray]], dict,
                                                         dict[str, bool] | None, bool]:
    """(inputs by name, request parameters, requested outputs -> binary?, all outputs binary?) of a REST request."""
    inputs, offset = header.get("inputs"), 0
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "request must have a non-empty 'inputs' list")
    arrays = {}
    for t in inputs:
        name, datatype, a, offset = tensor_from_json(t, binary, offset)
        if name in arrays:
            raise RequestError(400, f"input {name!r} appears twice")
        arrays[name] = datatype, a
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes after the last binary input")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be an object")
    wanted = None
    if header.get("outputs") is not None:
        outs = header["outputs"]
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                 for o in outs):
            raise RequestError(400, "'outputs' must be a list of objects with a 'name'")
        wanted = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", False)) for o in outs}
    return arrays, params, wanted, bool(params.get("binary_data_output", False))


def response_http(spec: ModelSpec, request_id: Any, outputs: dict[str, np.ndarray], wanted: dict[str, bool] | None,
                  all_binary: bool) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of a REST response: outputs binary where asked, else JSON data."""
    names = output_names(spec, wanted)
    header: dict[str, Any] = {"model_name": spec.name, "model_version": VERSION, "outputs": []}
    if request_id is not None:
        header["id"] = request_id
    chunks = []
    for name in names:
        a = outputs[name]
        entry = {"name": name, "datatype": DATATYPE_OF[a.dtype], "shape": list(a.shape)}
        if (wanted or {}).get(name, all_binary):
            raw = to_bytes(a)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = a.reshape(-1)
        header["outputs"].append(entry)
    body = _dumps(header)
    return (body + b"".join(chunks), len(body)) if chunks else (body, None)


try:  # orjson: the header of a one-item request parses and writes several times faster than with json
    import orjson

    def _dumps(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - the standard library does the same, slower
    def _dumps(obj) -> bytes:
        return json.dumps(obj, default=lambda a: a.tolist()).encode()

    _loads = json.loads


# ---- the operation: checked inputs -> the batcher -> outputs (shared by HTTP and gRPC) ----

def check_request(spec: ModelSpec, arrays: dict[str, tuple[str, np.ndarray]], params: dict,
                  wanted: dict | None) -> tuple[np.ndarray, dict]:
    """(the operation's input array, its options) after checking names, datatypes and parameters."""
    missing = [t.name for t in spec.inputs if t.name not in arrays]
    extra = [n for n in arrays if n not in {t.name for t in spec.inputs}]
    if missing or extra:
        raise RequestError(400, f"model {spec.name!r} takes input"
                                 f"{'s' if len(spec.inputs) > 1 else ''} {', '.join(t.name for t in spec.inputs)}"
                                 + (f"; unknown input {', '.join(map(repr, extra))}" if extra else ""))
    unknown = [p for p in params if p not in spec.parameters and p not in PROTOCOL_PARAMETERS]
    if unknown:
        raise RequestError(400, f"unknown parameter {', '.join(map(repr, unknown))} for {spec.name!r}; it takes "
                                 f"{', '.join(spec.parameters) or 'no parameters'}")
    if wanted is not None:
        bad = [n for n in wanted if n not in {t.name for t in spec.outputs}]
        if bad:
            raise RequestError(400, f"unknown output {', '.join(map(repr, bad))} for {spec.name!r}; it has "
                                     f"{', '.join(t.name for t in spec.outputs)}")
    t = spec.inputs[0]
    datatype, a = arrays[t.name]
    if datatype not in t.accepts:
        raise RequestError(400, f"input {t.name!r}: datatype {datatype} is not accepted; send "
                                 f"{' or '.join(sorted(t.accepts))}")
    options = {p: params[p] for p in spec.parameters if p in params}
    if spec.op == "sample":
        if a.size != 1:
            raise RequestError(400, f"input 'n' must hold one integer, got shape {list(a.shape)}")
        options["n"] = int(a.reshape(-1)[0])
        return a, options
    if a.ndim == 0:
        raise RequestError(400, f"input {t.name!r} must have a batch dimension first")
    return a, options


def outputs_of(spec: ModelSpec, result: dict) -> dict[str, np.ndarray]:
    """The batcher's answer -> output arrays named and shaped as the model's metadata says."""
    out = {}
    for t in spec.outputs:
        a = np.asarray(result[t.source or t.name], dtype=DATATYPES[t.datatype])
        out[t.name] = a.reshape(len(a), *t.shape[1:]) if len(t.shape) > 1 else a.reshape(-1)
    return out


def triton_config(spec: ModelSpec, max_batch: int) -> dict:
    """The model as Triton's model configuration (JSON form): what Triton's own tools (perf_analyzer,
    model_analyzer) read before they send requests. The batch is the first dimension (max_batch_size)."""
    def tensors(ts):
        return [{"name": t.name, "data_type": f"TYPE_{t.datatype}",
                 "dims": list(t.shape[1:]) if t.shape[0] == -1 else list(t.shape)} for t in ts]

    batched = all(t.shape[0] == -1 for t in spec.inputs)
    return {"name": spec.name, "platform": PLATFORM, "backend": PLATFORM, "max_batch_size": max_batch if batched else 0,
            "input": tensors(spec.inputs), "output": tensors(spec.outputs),
            "parameters": {p: {"string_value": ""} for p in spec.parameters}}
