"""Serving errors as TF Serving reports them: a canonical status code, a message, and its HTTP twin."""

from __future__ import annotations

import grpc

# tensorflow_serving/model_servers/http_server.cc, ToHTTPStatusCode (499 is its CLIENT_CLOSED_REQUEST).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """A failed request: `code` picks the gRPC status and the HTTP status, `message` goes to the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def from_tf_error(error: Exception) -> ServingError:
    """A TensorFlow runtime error (tf.errors.OpError carries a canonical code) as a ServingError."""
    code = getattr(error, "error_code", None)
    status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.INTERNAL)
    return ServingError(status, getattr(error, "message", None) or str(error))
