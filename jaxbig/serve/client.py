"""Clients for a TF Serving endpoint (real or embedded): REST JSON and gRPC `PredictionService`.

    rest = RestClient("localhost:8501", "tiny")
    logits = rest.predict({"tokens": tokens_BT})["logits"]            # columnar request
    grpc_client = GrpcClient("localhost:8500", "tiny")
    tokens = grpc_client.predict({"prompt": p_BP, "max_new_tokens": np.int32(20), "temperature": np.float32(0),
                                  "seed": np.int32(0)}, signature="generate")["tokens"]
    text = generate_text(rest, "def ", tokenizer=ByteTokenizer())

Both raise `ServingError` carrying the server's status code and message (TF Serving's error JSON
`{"error": ...}` or the gRPC status). They hold a keep-alive session / channel: reuse one per thread.
Given the model's limits (`limits=ModelLimits.read(version_dir)`, as `served_text` does from the
export's manifest), `predict` checks a request as the embedded server would (jaxbig.serve.limits)
and raises ServingError(INVALID_ARGUMENT) before anything is sent; `generate_text` checks its
arguments (temperature, seed, max_new_tokens) even without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.serve.errors import HTTP_STATUS, ServingError
from jaxbig.serve.limits import ModelLimits, check_generate_args

_FROM_HTTP = {v: k for k, v in reversed(list(HTTP_STATUS.items()))}


def _base_url(server: str) -> str:
    return server.rstrip("/") if "://" in server else f"http://{server.rstrip('/')}"


def _path(model: str, version: int | None, label: str | None) -> str:
    if version is not None and label is not None:
        raise ValueError(f"give a version ({version}) or a label ({label!r}), not both")
    return f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else f"/labels/{label}" if label else "")


class NotSent(ServingError):
    """A request the client refused to send; the server would have answered it with this error."""


def _check(limits: ModelLimits | None, signature: str, inputs: dict[str, Any]) -> None:
    try:
        if signature == "generate" and {"max_new_tokens", "temperature", "seed"} <= set(inputs):
            check_generate_args(inputs["max_new_tokens"], inputs["temperature"], inputs["seed"])
        if limits is not None:
            limits.check(signature or "serving_default", inputs)
    except ServingError as e:
        raise NotSent(e.code, e.message) from None


class RestClient:
    def __init__(self, server: str, model: str, *, timeout: float = 60.0, limits: ModelLimits | None = None):
        import requests  # the de-facto HTTP client, with connection pooling and keep-alive

        self.base, self.model, self.timeout, self.limits = _base_url(server), model, timeout, limits
        self.session = requests.Session()

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        r = self.session.request(method, self.base + path, data=None if body is None else json.dumps(body), timeout=self.timeout)
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": r.text}
        if r.status_code != 200:
            code = _FROM_HTTP.get(r.status_code, grpc.StatusCode.UNKNOWN)
            raise ServingError(code, payload.get("error", r.text) if isinstance(payload, dict) else r.text)
        return payload

    def status(self, *, version: int | None = None, label: str | None = None) -> list[dict]:
        return self._json("GET", _path(self.model, version, label))["model_version_status"]

    def available_versions(self) -> list[int]:
        return sorted(int(s["version"]) for s in self.status() if s["state"] == "AVAILABLE")

    def metadata(self, *, version: int | None = None, label: str | None = None) -> dict:
        return self._json("GET", _path(self.model, version, label) + "/metadata")

    def predict(self, inputs: dict[str, Any], *, signature: str = "", version: int | None = None, label: str | None = None) -> dict[str, np.ndarray]:
        """Columnar request; returns {output name: array} (the name comes from metadata when the server drops it)."""
        _check(self.limits, signature, inputs)
        body: dict = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
        if signature:
            body["signature_name"] = signature
        outputs = self._json("POST", _path(self.model, version, label) + ":predict", body)["outputs"]
        if isinstance(outputs, dict):
            return {k: np.asarray(v) for k, v in outputs.items()}
        meta = self.metadata(version=version, label=label)["metadata"]["signature_def"]["signature_def"]
        (name,) = meta[signature or "serving_default"]["outputs"]
        return {name: np.asarray(outputs)}

    def predict_rows(self, instances: list, *, signature: str = "", version: int | None = None) -> Any:
        """Row ("instances") request; returns the raw "predictions" list."""
        body: dict = {"instances": instances}
        if signature:
            body["signature_name"] = signature
        return self._json("POST", _path(self.model, version, None) + ":predict", body)["predictions"]


class GrpcClient:
    def __init__(self, server: str, model: str, *, timeout: float = 60.0, max_message_bytes: int = 64 << 20, limits: ModelLimits | None = None):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.model, self.timeout, self.limits = model, timeout, limits
        self.channel = grpc.insecure_channel(server, options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)])
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _spec(self, spec, signature: str = "", version: int | None = None, label: str | None = None):
        spec.name = self.model
        if signature:
            spec.signature_name = signature
        if version is not None:
            spec.version.value = version
        if label:
            spec.version_label = label
        return spec

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ServingError(e.code(), e.details()) from None

    def predict(self, inputs: dict[str, Any], *, signature: str = "", version: int | None = None, label: str | None = None) -> dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        _check(self.limits, signature, inputs)
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature, version, label)
        for k, v in inputs.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        response = self._call(self.prediction.Predict, request)
        self.last_version = response.model_spec.version.value
        return {k: tf.make_ndarray(t) for k, t in response.outputs.items()}

    def status(self, *, version: int | None = None, label: str | None = None):
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, version=version, label=label)
        return self._call(self.models.GetModelStatus, request).model_version_status

    def available_versions(self) -> list[int]:
        from tensorflow_serving.apis import get_model_status_pb2

        available = get_model_status_pb2.ModelVersionStatus.State.Value("AVAILABLE")
        return sorted(s.version for s in self.status() if s.state == available)

    def metadata(self, *, version: int | None = None):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, version=version)
        return self._call(self.prediction.GetModelMetadata, request)

    def close(self) -> None:
        self.channel.close()


def load_tokenizer(manifest_path: str | Path):
    """The tokenizer an export recorded in its manifest.json."""
    from jaxbig.data.tokenizer import tokenizer_from_dict  # only clients that (de)tokenize load jaxbig.data (and JAX)

    path = Path(manifest_path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist; pass the export's version directory or its manifest.json (written by scripts/export.py)")
    return tokenizer_from_dict(json.loads(path.read_text())["tokenizer"], path.parent)


def generate_text(client: RestClient | GrpcClient, prompt: str, *, tokenizer, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0, version: int | None = None) -> str:
    """Tokenizes `prompt`, calls the `generate` signature, and decodes the continuation (up to EOS).

    Arguments the model cannot honour raise NotSent (a ServingError, INVALID_ARGUMENT) before anything is sent.
    """
    prompt_P = tokenizer.encode(prompt)
    if len(prompt_P) == 0:
        raise ConfigError("the prompt is empty; give at least one character, e.g. --prompt 'def '")
    # checked before the int32/float32 conversions below, which would wrap or overflow bad values
    _check(client.limits, "generate", {"prompt": np.asarray(prompt_P)[None], "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed})
    inputs = {
        "prompt": np.asarray(prompt_P, np.int32)[None],
        "max_new_tokens": np.int32(max_new_tokens),
        "temperature": np.float32(temperature),
        "seed": np.int32(seed),
    }
    ids = client.predict(inputs, signature="generate", version=version)["tokens"][0]
    eos = np.flatnonzero(ids == getattr(tokenizer, "eos_id", -1))
    return tokenizer.decode(ids[: eos[0]] if len(eos) else ids)


def served_text(
    server: str, model: str, prompt: str, *, grpc: bool = False, model_base_path: str | Path | None = None,
    max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
) -> str:
    """`generate_text` against a server, with the tokenizer and limits from the export of the version it serves as latest.

    Bad arguments are a ConfigError before the generate request is sent: the ones any model refuses before
    the server is contacted, the ones that depend on the export (prompt length, vocabulary) once its
    manifest is read.
    """
    args = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    try:
        _check(None, "generate", args)
    except NotSent as e:
        raise ConfigError(f"not sent: {e.message}") from None
    client = GrpcClient(server, model) if grpc else RestClient(server, model)
    try:
        available = client.available_versions()
    except ServingError as e:
        raise ConfigError(f"{server} did not answer for model {model!r}: {e.code.name}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - connection refused and friends, as one clear line
        raise ConfigError(f"cannot reach {server}: {type(e).__name__}; is scripts/serve.py running there?") from None
    if not available:
        raise ConfigError(f"model {model!r} on {server} has no AVAILABLE version yet")
    version = max(available)
    version_dir = Path(model_base_path or Path("exports") / model) / str(version)
    tokenizer = load_tokenizer(version_dir / "manifest.json")
    client.limits = ModelLimits.read(version_dir)
    try:
        return generate_text(client, prompt, tokenizer=tokenizer, version=version, **args)
    except NotSent as e:
        raise ConfigError(f"not sent: {e.message}") from None
    except ServingError as e:
        raise ConfigError(f"the server refused the request: {e.code.name}: {e.message}") from None
