"""TF Serving's gRPC API on the official `tensorflow-serving-api` protos and stubs.

`tensorflow.serving.PredictionService`: Predict and GetModelMetadata (Classify, Regress and
MultiInference answer UNIMPLEMENTED: jaxbig exports predict signatures only);
`tensorflow.serving.ModelService`: GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED).
Messages over `max_request_bytes` are refused by gRPC itself with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from jaxbig.serve.core import DEFAULT_SIGNATURE, ServingCore
from jaxbig.serve.errors import ServingError, invalid_argument
from jaxbig.serve.metrics import Metrics
from jaxbig.serve.models import ModelSpec


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
    def __init__(self, core: ServingCore, metrics: Metrics):
        self.core, self.metrics = core, metrics

    def _call(self, api: str, request, context, fn):
        start = time.perf_counter()
        try:
            response = fn(request)
        except ServingError as e:
            self.metrics.observe(request.model_spec.name, api, "grpc", e.code.name, time.perf_counter() - start)
            context.abort(e.code, e.message)
        self.metrics.observe(request.model_spec.name, api, "grpc", "OK", time.perf_counter() - start)
        return response


class PredictionService(_Service, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):  # noqa: N802 - the proto's method names
        return self._call("predict", request, context, self._predict)

    def _predict(self, request):
        import tensorflow as tf

        spec = _spec(request.model_spec)
        try:
            inputs = {k: tf.make_ndarray(t) for k, t in request.inputs.items()}
        except (TypeError, ValueError) as e:
            raise invalid_argument(f"could not read an input TensorProto: {e}") from None
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        version, outputs = self.core.predict(spec, signature, inputs, tuple(request.output_filter))
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
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core, metrics), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}; is the port in use?")
    return server, port
