"""TF Serving's REST API (api_rest.md, http_rest_api_handler.cc) on the standard library's HTTP server.

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            GetModelStatus as JSON
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   GetModelMetadata (signature_def) as JSON
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row ("instances") or columnar ("inputs")
    GET  /monitoring/prometheus/metrics                          Prometheus text format
Errors are `{"error": "<message>"}` with TF Serving's status mapping (errors.HTTP_STATUS); bodies
over `max_request_bytes` get 413, a malformed Content-Length 400, a chunked body 411, and what
http.server itself refuses (a malformed request line or headers) the same JSON error shape. A bug
that raises anything but a ServingError answers 500 with the exception's text, never a dropped
connection. `http.server` is enough here: HTTP/1.1 keep-alive, a thread per connection, and no
dependency beyond the standard library for an API this small.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format

from jaxbig.serve import json_tensors
from jaxbig.serve.core import ServingCore, input_dtypes, max_input_rank
from jaxbig.serve.errors import ServingError, invalid_argument
from jaxbig.serve.metrics import PATH as METRICS_PATH
from jaxbig.serve.metrics import Metrics
from jaxbig.serve.models import ModelSpec

# http_rest_api_util.cc, kPredictionApiGegex and kModelStatusApiRegex.
PREDICT_RE = re.compile(r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
STATUS_RE = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
DRAIN_LIMIT = 256 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413
INT64_MAX = 2**63 - 1
log = logging.getLogger(__name__)


def _version(text: str | None) -> int | None:
    if not text:
        return None
    # absl::SimpleAtoi into an int64, as TF Serving parses it (int() would also refuse > 4300 digits with ValueError)
    if len(text) > 19 or int(text) > INT64_MAX:
        raise invalid_argument(f"Failed to convert version: {text[:40]}{'...' if len(text) > 40 else ''} to numeric.")
    return int(text)


def _spec(name: str | None, version: str | None, label: str | None) -> ModelSpec:
    if not name:
        raise invalid_argument("Missing model name in request.")
    return ModelSpec(name=urllib.parse.unquote(name), version=_version(version), label=urllib.parse.unquote(label) if label else None)


def _print_options() -> dict:
    # JsonPrintOptions of ToJsonString: every field, even at its default (always_print_fields_with_no_presence).
    return {"always_print_fields_with_no_presence": True}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's evhttp server
    # TCP_NODELAY: a response goes out as two writes (headers, body); with Nagle the body waits for the
    # client's delayed ACK of the headers, ~40 ms per request on a keep-alive connection (Linux)
    disable_nagle_algorithm = True
    server: "RestServer"

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # one line per request on stderr is noise at load; the metrics count requests

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: ServingError, status: int | None = None) -> None:
        self._send(status or error.http_status, json.dumps({"error": error.message}).encode())

    def send_error(self, code, message=None, explain=None):
        """What http.server refuses by itself (request line, headers), in TF Serving's error shape, then closes."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a request line it could not read: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self._send(int(code), json.dumps({"error": message or HTTPStatus(code).phrase}).encode())

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = urllib.parse.urlsplit(self.path).path
        if path == METRICS_PATH:
            body, content_type = self.server.metrics.exposition()
            return self._send(200, body, content_type)
        self._dispatch("GET", path, b"")

    def _refuse_body(self, status: int, error: ServingError) -> None:
        self.close_connection = True  # what follows on this connection cannot be framed
        self.server.metrics.observe(self.server.model_name, "predict", "rest", error.code.name, 0.0)
        self._error(error, status)

    def do_POST(self):  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if self.headers.get("Transfer-Encoding"):
            return self._refuse_body(411, invalid_argument("Transfer-Encoding is not supported; send the body with a Content-Length"))
        header = self.headers.get("Content-Length") or "0"
        if not (header.isascii() and header.isdigit()) or len(header) > 19:
            return self._refuse_body(400, invalid_argument(f"Content-Length {header[:40]!r} is not a byte count"))
        length = int(header)
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True
            left = length if length <= DRAIN_LIMIT else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
            error = ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Request body of {length} bytes exceeds the server's limit of {limit} bytes (--max_request_bytes)")
            return self._refuse_body(413, error)
        self._dispatch("POST", path, self.rfile.read(length) if length else b"")

    def _dispatch(self, method: str, path: str, body: bytes) -> None:
        start, api = time.perf_counter(), "predict" if method == "POST" else "status"
        model = self.server.model_name
        try:
            if not path.lower().startswith("/v1/"):
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Not found: {method} {path}; the API is under /v1/models/")
            match = (PREDICT_RE if method == "POST" else STATUS_RE).fullmatch(path)
            if match is None:
                raise invalid_argument(f"Malformed request: {method} {path}")
            if method == "POST":
                name, version, label, verb = match.groups()
                spec = _spec(name, version, label)
                if verb.lower() != "predict":
                    raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f":{verb} is not implemented by jaxbig's embedded server (jaxbig models have predict signatures only)")
                payload = self._predict(spec, body)
            else:
                name, version, label, sub = match.groups()
                spec = _spec(name, version, label)
                if sub:
                    api = "metadata"
                    payload = self._metadata(spec)
                else:
                    payload = json_format.MessageToJson(self.server.core.status_proto(spec), indent=1, **_print_options()).encode()
            model = spec.name
        except ServingError as e:
            self.server.metrics.observe(model, api, "rest", e.code.name, time.perf_counter() - start)
            return self._error(e)
        except Exception as e:  # noqa: BLE001 - a bug: the client gets a 500 with its text rather than a dropped connection
            log.exception("%s %s failed", method, path)
            error = ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            self.server.metrics.observe(model, api, "rest", error.code.name, time.perf_counter() - start)
            return self._error(error)
        self.server.metrics.observe(model, api, "rest", "OK", time.perf_counter() - start)
        self._send(200, payload)

    def _predict(self, spec: ModelSpec, body: bytes) -> bytes:
        core = self.server.core
        with core.manager.acquire(spec) as servable:  # one version for parsing and running
            doc = json_tensors.parse_json(body, json_tensors.depth_limit(max_input_rank(servable)))
            signature = json_tensors.signature_name(doc)
            inputs, fmt = json_tensors.parse_predict(doc, input_dtypes(servable, signature))
            outputs = core.run(servable, signature, inputs)
        return json_tensors.format_predict(outputs, fmt)

    def _metadata(self, spec: ModelSpec) -> bytes:
        # ToJsonString(GetModelMetadataResponse): proto field names kept, the Any unpacked by hand.
        from tensorflow_serving.apis import get_model_metadata_pb2

        response = self.server.core.metadata_proto(spec)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sigs)
        opts = dict(_print_options(), preserving_proto_field_name=True)
        model_spec = json.loads(json_format.MessageToJson(response.model_spec, **opts))
        signature_def = json.loads(json_format.MessageToJson(sigs, **opts))
        return json.dumps({"model_spec": model_spec, "metadata": {"signature_def": signature_def}}, indent=1).encode()


class RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], core: ServingCore, metrics: Metrics, *, max_request_bytes: int):
        super().__init__(address, _Handler)
        self.core, self.metrics, self.max_request_bytes = core, metrics, max_request_bytes
        self.model_name = core.manager.name
