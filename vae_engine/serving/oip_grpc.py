"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` with ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, served by grpc.aio on the HTTP server's own
event loop, so a request goes through the same input rule, micro-batcher and random streams as /v1 and /v2 REST.

The messages are built at import from the protocol's field table below (KServe's grpc_predict_v2.proto; Triton's
grpc_service.proto uses the same names and field numbers), in a private descriptor pool: no generated code, so no
tie to one protobuf release, and no clash with a client library's copy of the same package in the process.
Outputs always travel as raw_output_contents (as Triton's do); inputs as raw_input_contents or typed contents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import oip
from .oip import RequestError

if TYPE_CHECKING:
    from .app import App

SERVICE = "inference.GRPCInferenceService"
PARAMETERS = "map:InferParameter"
MESSAGES: dict[str, list[tuple[str, int, str]]] = {  # message -> (field, number, type); "*type": repeated
    "ServerLiveRequest": [], "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [], "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "*string")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [("name", 1, "string"), ("versions", 2, "*string"), ("platform", 3, "string"),
                              ("inputs", 4, "*ModelMetadataResponse.TensorMetadata"),
                              ("outputs", 5, "*ModelMetadataResponse.TensorMetadata")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "*int64")],
    "InferParameter": [("bool_param", 1, "?bool"), ("int64_param", 2, "?int64"), ("string_param", 3, "?string"),
                       ("double_param", 4, "?double"), ("uint64_param", 5, "?uint64")],  # ?: in one oneof
    "InferTensorContents": [("bool_contents", 1, "*bool"), ("int_contents", 2, "*int32"),
                            ("int64_contents", 3, "*int64"), ("uint_contents", 4, "*uint32"),
                            ("uint64_contents", 5, "*uint64"), ("fp32_contents", 6, "*float"),
                            ("fp64_contents", 7, "*double"), ("bytes_contents", 8, "*bytes")],
    "ModelInferRequest": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                          ("parameters", 4, PARAMETERS), ("inputs", 5, "*ModelInferRequest.InferInputTensor"),
                          ("outputs", 6, "*ModelInferRequest.InferRequestedOutputTensor"),
                          ("raw_input_contents", 7, "*bytes")],
    "ModelInferRequest.InferInputTensor": [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "*int64"),
                                           ("parameters", 4, PARAMETERS), ("contents", 5, "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"), ("parameters", 2, PARAMETERS)],
    "ModelInferResponse": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                           ("parameters", 4, PARAMETERS), ("outputs", 5, "*ModelInferResponse.InferOutputTensor"),
                           ("raw_output_contents", 6, "*bytes")],
    "ModelInferResponse.InferOutputTensor": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "*int64"), ("parameters", 4, PARAMETERS),
                                             ("contents", 5, "InferTensorContents")],
}
METHODS = {"ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
           "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
           "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
           "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
           "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
           "ModelInfer": ("ModelInferRequest", "ModelInferResponse")}
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP16": "fp32_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _messages() -> dict[str, type]:
    """The message classes, from MESSAGES, in a private pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    scalars = {"bool": F.TYPE_BOOL, "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES, "int32": F.TYPE_INT32,
               "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32, "uint64": F.TYPE_UINT64, "float": F.TYPE_FLOAT,
               "double": F.TYPE_DOUBLE}
    fdp = descriptor_pb2.FileDescriptorProto(name="vae_engine/grpc_predict_v2.proto", package="inference",
                                             syntax="proto3")
    made: dict[str, Any] = {}
    for full, fields in MESSAGES.items():
        outer, _, inner = full.partition(".")
        msg = made[full] = (made[outer].nested_type.add(name=inner) if inner else fdp.message_type.add(name=outer))
        for name, number, kind in fields:
            f = msg.field.add(name=name, number=number, json_name=name)
            label = F.LABEL_REPEATED if kind[0] in "*" or kind.startswith("map:") else F.LABEL_OPTIONAL
            f.label = label
            kind = kind.lstrip("*")
            if kind.startswith("?"):  # InferParameter's oneof
                if not msg.oneof_decl:
                    msg.oneof_decl.add(name="parameter_choice")
                f.oneof_index, kind = 0, kind[1:]
            if kind.startswith("map:"):  # map<string, V>: a repeated nested XEntry{key=1, value=2}
                entry = msg.nested_type.add(name="ParametersEntry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
                entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                                type_name=f".inference.{kind[4:]}")
                f.type, f.type_name = F.TYPE_MESSAGE, f".inference.{full}.ParametersEntry"
            elif kind in scalars:
                f.type = scalars[kind]
            else:
                f.type, f.type_name = F.TYPE_MESSAGE, f".inference.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return {name: get(pool.FindMessageTypeByName(f"inference.{name}")) for name in MESSAGES}


_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
          422: "INVALID_ARGUMENT", 499: "CANCELLED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _parameter(p) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def request_tensors(request) -> dict[str, tuple[str, np.ndarray]]:
    """A ModelInferRequest's inputs -> {name: (datatype, array)}, from raw_input_contents or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per "
                                "input, in order, or none")
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        shape = oip.check_header(name, t.datatype, tuple(t.shape))
        if name in arrays:
            raise RequestError(400, f"input {name!r} appears twice")
        if raw:
            a = oip.from_bytes(raw[i], name, t.datatype, shape)
        else:
            a = oip.from_values(list(getattr(t.contents, CONTENTS[t.datatype])), name, t.datatype, shape)
        arrays[name] = t.datatype, a
    return arrays


class Service:
    """The GRPCInferenceService methods over one App."""

    def __init__(self, app: App):
        self.app, self.msg = app, _messages()

    async def ServerLive(self, request, context):
        return self.msg["ServerLiveResponse"](live=True)

    async def ServerReady(self, request, context):
        return self.msg["ServerReadyResponse"](ready=True)

    async def ModelReady(self, request, context):
        await self._model(request.name, request.version, context)
        return self.msg["ModelReadyResponse"](ready=True)

    async def ServerMetadata(self, request, context):
        return self.msg["ServerMetadataResponse"](**self.app.server_metadata())

    async def ModelMetadata(self, request, context):
        meta = (await self._model(request.name, request.version, context)).metadata()
        return self.msg["ModelMetadataResponse"](**meta)

    async def ModelInfer(self, request, context):
        a = self.app
        with a.tracked("v2") as t:
            try:
                t.endpoint = f"v2/{a.model(request.model_name, request.model_version).op}"
                params = {k: _parameter(v) for k, v in request.parameters.items()}
                wanted = {o.name: True for o in request.outputs} or None
                spec, outputs = await a.infer(request.model_name, request.model_version, request_tensors(request),
                                              params, wanted, cancelled=context.cancelled,
                                              time_left=context.time_remaining())  # the client's deadline
            except Exception as exc:  # noqa: BLE001 - one line to the caller (App.failure), never a traceback
                t.code, message = a.failure(exc)
                await context.abort(_code(t.code), message)
        response = self.msg["ModelInferResponse"](model_name=spec.name, model_version=oip.VERSION, id=request.id)
        for name in oip.output_names(spec, wanted):
            out = outputs[name]
            response.outputs.add(name=name, datatype=oip.DATATYPE_OF[out.dtype], shape=out.shape)
            response.raw_output_contents.append(oip.to_bytes(out))
        return response

    async def _model(self, name: str, version: str, context) -> oip.ModelSpec:
        try:
            return self.app.model(name, version)
        except RequestError as exc:
            await context.abort(_code(exc.status), exc.message)

    def handler(self):
        import grpc

        methods = {}
        for method, (req, resp) in METHODS.items():
            methods[method] = grpc.unary_unary_rpc_method_handler(
                getattr(self, method), request_deserializer=self.msg[req].FromString,
                response_serializer=self.msg[resp].SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def _code(status: int):
    import grpc

    return getattr(grpc.StatusCode, _CODES.get(status, "INTERNAL"))


async def start(app: App, host: str, port: int, share_port: bool = False):
    """A grpc.aio server for `app` on host:port, started on the running event loop; `await server.stop(grace)`.
    `share_port`: several worker processes listen on one port (SO_REUSEPORT); otherwise a busy port is an error."""
    import grpc

    limit = app.limits.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 64 << 20)),
                                      ("grpc.so_reuseport", int(share_port))])
    server.add_generic_rpc_handlers((Service(app).handler(),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    return server
