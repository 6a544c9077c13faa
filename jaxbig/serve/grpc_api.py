"""TF Serving's gRPC API on the official `tensorflow-serving-api` protos and stubs.

`tensorflow.serving.PredictionService`: Predict and GetModelMetadata (Classify, Regress and
MultiInference answer UNIMPLEMENTED: jaxbig exports predict signatures only);
`tensorflow.serving.ModelService`: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED).
Messages over `max_request_bytes` are refused by gRPC itself with RESOURCE_EXHAUSTED.

Malformed requests are INVALID_ARGUMENT, never gRPC's INTERNAL: bytes that do not parse as the
method's request message (the services are registered with a deserializer that hands the error to
the method, `_lenient`), and input TensorProtos whose dtype, declared shape or contents disagree
with the signature. A TensorProto is checked before it becomes an array (`read_inputs`): its
"repeat the last value" shorthand lets a few bytes declare a tensor of any size, so a declared
element count above `max_request_bytes` is refused before anything is allocated.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent import futures

import grpc
import numpy as np
from google.protobuf import message_factory
from tensorflow_serving.apis import model_service_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2, prediction_service_pb2_grpc

from jaxbig.serve.core import DEFAULT_SIGNATURE, ServingCore
from jaxbig.serve.errors import ServingError, invalid_argument
from jaxbig.serve.metrics import Metrics
from jaxbig.serve.models import ModelSpec, numpy_dtype, tf_dtype_name

log = logging.getLogger(__name__)


class _Unreadable:
    """A request whose bytes did not parse as the method's message; the method answers INVALID_ARGUMENT."""

    def __init__(self, message_type: str, error: Exception):
        self.message = f"could not parse the request as a {message_type}: {type(error).__name__}: {error}"


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and whatever else the parser raises: the client's bytes
            return _Unreadable(message_class.DESCRIPTOR.full_name, e)

    return parse


def _add_service(server: grpc.Server, servicer, service) -> None:
    """Registers every method of a proto service (`service`: its ServiceDescriptor) on `servicer`'s methods.

    What the generated add_*Servicer_to_server does, with `_lenient` as the request deserializer
    (the generated one raises, and gRPC then answers INTERNAL "Exception deserializing request!").
    """
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_lenient(message_factory.GetMessageClass(m.input_type)),
            response_serializer=message_factory.GetMessageClass(m.output_type).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _dtype_name(enum: int) -> str:
    try:
        return tf_dtype_name(enum)
    except TypeError:
        return f"an unknown dtype (enum {enum})"


def read_inputs(protos, sig, signature: str, max_elements: int) -> dict:
    """The request's TensorProtos as arrays, each checked against the signature before it is materialized."""
    import tensorflow as tf

    ServingCore.check_input_names(sig, signature, set(protos))
    inputs = {}
    for name in sorted(protos):
        proto, info = protos[name], sig.inputs[name]
        if proto.dtype != info.dtype:
            raise ServingCore.dtype_error(info, signature, name, _dtype_name(proto.dtype))
        if proto.tensor_shape.unknown_rank:
            raise invalid_argument(f"input '{name}' of signature '{signature}' has unknown rank; give its shape")
        shape = [d.size for d in proto.tensor_shape.dim]
        ServingCore.check_shape(info, signature, name, shape)
        elements = math.prod(shape)
        if elements > max_elements:
            raise invalid_argument(f"input '{name}' of signature '{signature}' declares shape {shape}, {elements} elements; the server reads at most {max_elements} (--max_request_bytes)")
        itemsize = np.dtype(numpy_dtype(info.dtype)).itemsize
        if proto.tensor_content and len(proto.tensor_content) != elements * itemsize:
            raise invalid_argument(
                f"input '{name}' of signature '{signature}' has {len(proto.tensor_content)} bytes of tensor_content; shape {shape} of {_dtype_name(proto.dtype)} needs {elements * itemsize}"
            )
        try:
            inputs[name] = tf.make_ndarray(proto)
        except (TypeError, ValueError) as e:  # more values than the shape holds, and other inconsistent protos
            raise invalid_argument(f"could not read input '{name}' of signature '{signature}' (shape {shape}): {e}") from None
    return inputs


def _spec(model_spec) -> ModelSpec:
    if not model_spec.name:
        raise invalid_argument("Missing ModelSpec")
    which = model_spec.WhichOneof("version_choice")
    return ModelSpec(
        name=model_spec.name,
        version=model_spec.version.value if which == "version" else None,
        label=model_spec.version_label if which == "version_label" else None,
    )


class _Service:
    def __init__(self, core: ServingCore, metrics: Metrics, max_request_bytes: int):
        self.core, self.metrics, self.max_request_bytes = core, metrics, max_request_bytes

    def _call(self, api: str, request, context, fn):
        # metrics carry the served model's name: a request's own name is the client's free text
        start, model = time.perf_counter(), self.core.manager.name
        try:
            if isinstance(request, _Unreadable):
                raise invalid_argument(request.message)
            response = fn(request)
        except ServingError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - a bug: INTERNAL with its text, counted like any other answer
            log.exception("gRPC %s failed", api)
            error = ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        else:
            self.metrics.observe(model, api, "grpc", "OK", time.perf_counter() - start)
            return response
        self.metrics.observe(model, api, "grpc", error.code.name, time.perf_counter() - start)
        context.abort(error.code, error.message)


class PredictionService(_Service, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):  # noqa: N802 - the proto's method names
        return self._call("predict", request, context, self._predict)

    def _predict(self, request):
        import tensorflow as tf

        spec = _spec(request.model_spec)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        with self.core.manager.acquire(spec) as servable:  # one version for reading and running
            sig = self.core.signature_def(servable, signature)
            inputs = read_inputs(request.inputs, sig, signature, self.max_request_bytes)
            outputs = self.core.run(servable, signature, inputs, tuple(request.output_filter))
            version = servable.version
        response = predict_pb2.PredictResponse()
        response.model_spec.name, response.model_spec.signature_name = spec.name, signature
        response.model_spec.version.value = version
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._call("metadata", request, context, lambda r: self.core.metadata_proto(_spec(r.model_spec), tuple(r.metadata_field)))


class ModelService(_Service, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request, context):  # noqa: N802
        return self._call("status", request, context, lambda r: self.core.status_proto(_spec(r.model_spec)))


def make_server(address: str, core: ServingCore, metrics: Metrics, *, max_request_bytes: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server bound to `address` ('127.0.0.1:0' picks a port) and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", max_request_bytes), ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)],
    )
    _add_service(server, PredictionService(core, metrics, max_request_bytes), prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"])
    _add_service(server, ModelService(core, metrics, max_request_bytes), model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}; is the port in use?")
    return server, port
