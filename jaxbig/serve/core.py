"""What both front ends (REST and gRPC) call: predict, model status and metadata, as TF Serving's protos.

Predict checks a request against the signature as TF Serving does before running it
(predict_util.cc: the set of inputs; then dtype and rank, which TF's session checks there),
and, beyond TF Serving, refuses empty batches up front instead of running the model on them,
then checks it against the model's limits from the export's manifest (jaxbig.serve.limits:
token ids in the vocabulary, lengths, generate's arguments). Both run here, above the runtime
that serves the version, so every runtime gets the same checks.
"""

from __future__ import annotations

import grpc
import numpy as np

from jaxbig.serve.batching import Batcher, BatchingParameters, batch_key
from jaxbig.serve.errors import ServingError, from_tf_error, invalid_argument
from jaxbig.serve.models import ModelManager, ModelSpec, Servable, numpy_dtype, tf_dtype_name

DEFAULT_SIGNATURE = "serving_default"


def input_dtypes(servable: Servable, signature: str) -> dict[str, str]:
    """The signature's inputs and their dtype names (HttpRestApiHandler::GetInfoMap), sorted by name."""
    name = signature or DEFAULT_SIGNATURE
    if name not in servable.signature_defs:
        raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
    inputs = servable.signature_defs[name].inputs
    return {k: tf_dtype_name(inputs[k].dtype) for k in sorted(inputs)}


UNKNOWN_RANK = 16  # what an input of unknown rank may have, for the JSON nesting limit (jaxbig's inputs have known ranks)


def max_input_rank(servable: Servable) -> int:
    """The largest rank among the inputs of all the version's signatures (how deep a request may nest)."""
    shapes = [t.tensor_shape for sig in servable.signature_defs.values() for t in sig.inputs.values()]
    return max((UNKNOWN_RANK if s.unknown_rank else len(s.dim) for s in shapes), default=0)


class ServingCore:
    def __init__(self, manager: ModelManager, batching: BatchingParameters | None, on_batch=lambda rows, requests: None, observers=()):
        self.manager = manager
        self.batcher = Batcher(batching, on_batch) if batching is not None else None
        # called with (version, signature, inputs, outputs) after every answered request (monitoring, request
        # logging); each must return at once (they queue, and do their work on their own threads)
        self.observers = tuple(observers)

    def signature_def(self, servable: Servable, signature: str):
        """The SignatureDef a request names ('' is serving_default); FAILED_PRECONDITION when the version lacks it."""
        signature = signature or DEFAULT_SIGNATURE
        if signature not in servable.functions:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
        return servable.signature_defs[signature]

    @staticmethod
    def check_input_names(sig, signature: str, sent: set[str]) -> None:
        wanted = set(sig.inputs)
        if wanted != sent:
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) != "
                f"len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."
            )

    @staticmethod
    def dtype_error(info, signature: str, name: str, sent: str) -> ServingError:
        return invalid_argument(f"Expects arg '{name}' of signature '{signature}' to be {tf_dtype_name(info.dtype)} but {sent} is provided")

    @staticmethod
    def check_shape(info, signature: str, name: str, shape: list[int]) -> None:
        """`shape` (an array's, or what a TensorProto declares) against the signature's; no empty tensors."""
        if any(s < 0 for s in shape):
            raise invalid_argument(f"input '{name}' of signature '{signature}' has shape {shape}; dimensions cannot be negative")
        if not info.tensor_shape.unknown_rank:
            dims = [d.size for d in info.tensor_shape.dim]
            if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise invalid_argument(f"input '{name}' of signature '{signature}' has shape {shape}; the signature expects {dims} (-1: any size)")
        if shape and shape[0] == 0:
            raise invalid_argument(f"input '{name}' of signature '{signature}' has a batch of 0 rows (shape {shape}); send at least one")
        if 0 in shape:
            raise invalid_argument(f"input '{name}' of signature '{signature}' is empty (shape {shape}); every dimension needs at least one element")

    def check_inputs(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray]) -> None:
        sig = servable.signature_defs[signature]
        self.check_input_names(sig, signature, set(inputs))
        for name in sorted(sig.inputs):
            info, arr = sig.inputs[name], inputs[name]
            if arr.dtype != np.dtype(numpy_dtype(info.dtype)):
                raise self.dtype_error(info, signature, name, arr.dtype.name)
            self.check_shape(info, signature, name, list(arr.shape))

    def run(self, servable: Servable, signature: str, inputs: dict[str, np.ndarray], output_filter=()) -> dict[str, np.ndarray]:
        """Validated inputs -> outputs of one version's signature, batched with other requests when enabled."""
        signature = signature or DEFAULT_SIGNATURE
        outputs_known = self.signature_def(servable, signature).outputs
        self.check_inputs(servable, signature, inputs)
        if servable.limits is not None:
            servable.limits.check(signature, inputs)
        for alias in output_filter:
            if alias not in outputs_known:
                raise invalid_argument(f"output tensor alias not found in signature: {alias} Outputs expected to be in the set {{{','.join(sorted(outputs_known))}}}.")

        def call(batch_inputs):
            try:
                return servable.run(signature, batch_inputs)
            except Exception as e:  # noqa: BLE001 - tf.errors.* carry the status code the client must see
                raise from_tf_error(e) from None

        key = batch_key(inputs) if self.batcher is not None else None
        outputs = call(inputs) if key is None else self.batcher.submit((id(servable), signature, key), inputs, call)
        for observe in self.observers:
            observe(servable.version, signature, inputs, outputs)
        return {k: v for k, v in outputs.items() if not output_filter or k in output_filter}

    def status_proto(self, spec: ModelSpec):
        from tensorflow_serving.apis import get_model_status_pb2

        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in self.manager.status(spec):
            status = response.model_version_status.add(version=version, state=get_model_status_pb2.ModelVersionStatus.State.Value(state.state))
            status.status.error_code = _error_code(state.error_code)
            status.status.error_message = state.error_message
        return response

    def metadata_proto(self, spec: ModelSpec, fields=("signature_def",)):
        from tensorflow_serving.apis import get_model_metadata_pb2

        for field in fields:
            if field != "signature_def":
                raise invalid_argument(f"Metadata field {field} is not supported")
        with self.manager.acquire(spec) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            sigs = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in servable.signature_defs.items():
                sigs.signature_def[name].CopyFrom(sig)
            response.metadata["signature_def"].Pack(sigs)
            return response

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()


def _error_code(name: str) -> int:
    from tensorflow.core.protobuf import error_codes_pb2

    return error_codes_pb2.Code.Value(name)
