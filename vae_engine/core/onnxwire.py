"""The protobuf wire format of ONNX files, read and written without onnx (whose import costs a job 0.04-0.8 s):
`fields` walks one message, `node` and `output` encode the few messages the engine appends to a checked graph,
`append_to_graph` splices them into a model's bytes. Field numbers are onnx.proto's; onnx's own parser is the
twin the tests compare with."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from .errors import ModelDirError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # wire types
MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_NODE, GRAPH_OUTPUT = 1, 12  # GraphProto.node, GraphProto.output
FLOAT, INT, FLOATS, INTS = 1, 2, 6, 7  # AttributeProto.AttributeType
TENSOR_FLOAT, TENSOR_UINT8, TENSOR_INT8, TENSOR_INT32 = 1, 2, 3, 6  # TensorProto.DataType


def fields(buf: memoryview, name: str) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one protobuf message: an int for varints and fixed-size
    fields, a memoryview for length-delimited ones (never copied). Malformed bytes are a ModelDirError."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= n or shift > 63:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file (bad varint)")
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while i < n:
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == VARINT:
            value = varint()
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if i + size > n:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file")
            value, i = int.from_bytes(buf[i:i + size], "little"), i + size
        elif wire == LENGTH:
            size = varint()
            if i + size > n:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file (a field runs past the end)")
            value, i = buf[i:i + size], i + size
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise ModelDirError(f"{name}: corrupt or truncated ONNX file (wire type {wire})")
        yield field, wire, value


def varints(buf: memoryview, name: str) -> list[int]:
    """The values of a packed repeated varint field (e.g. a tensor's dims written packed)."""
    out, value, shift = [], 0, 0
    for byte in bytes(buf):
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            out.append(value)
            value = shift = 0
        elif shift > 63:
            raise ModelDirError(f"{name}: corrupt or truncated ONNX file (bad varint)")
    if shift:
        raise ModelDirError(f"{name}: corrupt or truncated ONNX file (bad varint)")
    return out


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values: ten bytes, two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, value: int | float | str | bytes) -> bytes:
    """One encoded field: an int as a varint, a float as fixed32, a str or bytes length-delimited."""
    if isinstance(value, bool | int):
        return _varint(number << 3 | VARINT) + _varint(value)
    if isinstance(value, float):
        return _varint(number << 3 | FIXED32) + struct.pack("<f", value)
    data = value.encode() if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | LENGTH) + _varint(len(data)) + data


def attribute(name: str, value: float | int | list[int]) -> bytes:
    """AttributeProto (name 1, f 2, i 3, ints 8, type 20) of a float, an int or a list of ints."""
    if isinstance(value, list):
        body = b"".join(field(8, v) for v in value) + field(20, INTS)
    elif isinstance(value, float):
        body = field(2, value) + field(20, FLOAT)
    else:
        body = field(3, value) + field(20, INT)
    return field(1, name) + body


def node(op_type: str, inputs: list[str], outputs: list[str], **attributes: float | int | list[int]) -> bytes:
    """NodeProto (input 1, output 2, op_type 4, attribute 5) of the default domain."""
    return (b"".join(field(1, i) for i in inputs) + b"".join(field(2, o) for o in outputs) + field(4, op_type)
            + b"".join(field(5, attribute(k, v)) for k, v in attributes.items()))


def output(name: str, dims: tuple[int | str, ...], elem_type: int = TENSOR_FLOAT) -> bytes:
    """ValueInfoProto of a tensor (an input's or an output's): name 1, type 2 -> tensor_type 1 -> (elem_type 1,
    shape 2 -> dim 1 -> dim_value 1 | dim_param 2)."""
    shape = b"".join(field(1, field(2 if isinstance(d, str) else 1, d)) for d in dims)
    return field(1, name) + field(2, field(1, field(1, elem_type) + field(2, shape)))


def model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes], opset: int, ir_version: int = 8) -> bytes:
    """ModelProto (ir_version 1, opset_import 8 -> version 2, graph 7 -> node 1, name 2, input 11, output 12) of a
    small graph in the default domain."""
    graph = (b"".join(field(GRAPH_NODE, n) for n in nodes) + field(2, "graph") + b"".join(field(11, i) for i in inputs)
             + b"".join(field(GRAPH_OUTPUT, o) for o in outputs))
    return field(1, ir_version) + field(8, field(1, "") + field(2, opset)) + field(MODEL_GRAPH, graph)


def _copy(number: int, wire: int, value) -> bytes:
    if wire in (VARINT, LENGTH):
        return field(number, value)
    size = 8 if wire == FIXED64 else 4
    return _varint(number << 3 | wire) + value.to_bytes(size, "little")


def append_to_graph(model: bytes, nodes: list[bytes], outputs: list[bytes], name: str) -> bytes:
    """A model's bytes with `nodes` appended to its graph and the graph's outputs replaced by `outputs`; every
    other field copied as it is."""
    out = bytearray()
    for number, wire, value in fields(memoryview(model), name):
        if number == MODEL_GRAPH and wire == LENGTH:
            graph = b"".join(_copy(n, w, v) for n, w, v in fields(value, name) if n != GRAPH_OUTPUT)
            value = graph + b"".join(field(GRAPH_NODE, n) for n in nodes) + b"".join(
                field(GRAPH_OUTPUT, o) for o in outputs)
        out += _copy(number, wire, value)
    return bytes(out)
