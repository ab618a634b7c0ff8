"""The error hierarchy and its mappings to HTTP, gRPC and NATS replies.

Every error a client may see is a :class:`KefuError` subclass with a stable snake_case ``code``. The
same error crosses every boundary unchanged: a service raises it, the bus carries it as reply headers
(as nats micro's ``ServiceError`` does), and the gateway turns it into the CONTRACT error JSON or a
gRPC status.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

#: Reply headers that carry an error over NATS.
ERROR_CODE_HEADER = "Kefu-Error-Code"
# The family of the code (the class's own code), so a refined code unknown to the receiver keeps its status.
ERROR_KIND_HEADER = "Kefu-Error-Kind"
ERROR_MESSAGE_HEADER = "Kefu-Error-Message"
RETRY_AFTER_HEADER = "Kefu-Retry-After"


class KefuError(Exception):
    """Root of every error kefu reports to a client.

    Attributes:
        code: Stable snake_case identifier, part of the public contract.
        http_status: HTTP status the gateway answers with.
        grpc_status: gRPC status code the gateway answers with.
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.default_message()
        if code is not None:
            # Instance-level refinement of the code, e.g. "invalid_json" for a BadRequest.
            self.code = code  # type: ignore[misc]

    @classmethod
    def default_message(cls) -> str:
        return cls.code.replace("_", " ")

    def to_json(self) -> dict[str, Any]:
        """The CONTRACT error body: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}

    def to_headers(self) -> dict[str, str]:
        """NATS reply headers carrying this error."""
        return {ERROR_CODE_HEADER: self.code, ERROR_KIND_HEADER: type(self).code, ERROR_MESSAGE_HEADER: self.message}


class BadRequest(KefuError):
    code = "bad_request"
    http_status = 400
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(KefuError):
    code = "unauthenticated"
    http_status = 401
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KefuError):
    code = "forbidden"
    http_status = 403
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(KefuError):
    code = "not_found"
    http_status = 404
    grpc_status = grpc.StatusCode.NOT_FOUND


class Conflict(KefuError):
    code = "conflict"
    http_status = 409
    grpc_status = grpc.StatusCode.ABORTED


class PayloadTooLarge(KefuError):
    code = "payload_too_large"
    http_status = 413
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(KefuError):
    code = "rate_limited"
    http_status = 429
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str = "", *, retry_after: float = 1.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def to_headers(self) -> dict[str, str]:
        return {**super().to_headers(), RETRY_AFTER_HEADER: f"{self.retry_after:g}"}


class Unavailable(KefuError):
    code = "unavailable"
    http_status = 503
    grpc_status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KefuError):
    code = "deadline_exceeded"
    http_status = 504
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(KefuError):
    code = "internal"
    http_status = 500
    grpc_status = grpc.StatusCode.INTERNAL


_BY_BASE_CODE: dict[str, type[KefuError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthenticated, PermissionDenied, NotFound, Conflict, PayloadTooLarge,
                RateLimited, Unavailable, DeadlineExceeded, Internal)
}

# Refined codes map to their family so the status survives a hop over the bus.
_REFINED: dict[str, type[KefuError]] = {
    "invalid_json": BadRequest,
    "missing_field": BadRequest,
    "invalid_field": BadRequest,
    "invalid_utf8": BadRequest,
    "invalid_protobuf": BadRequest,
    "unknown_conversation": NotFound,
    "unknown_tenant": NotFound,
    "token_expired": Unauthenticated,
    "invalid_token": Unauthenticated,
    "invalid_credentials": Unauthenticated,
    "token_revoked": Unauthenticated,
    "permission_denied": PermissionDenied,
    "origin_not_allowed": PermissionDenied,
    "unknown_agent": NotFound,
    "concurrent_update": Conflict,
    "service_unavailable": Unavailable,
    "indexing": Unavailable,
    "busy": RateLimited,
    "model_timeout": DeadlineExceeded,
    "budget_exhausted": RateLimited,
    "key_unavailable": Unavailable,
    "audit_unavailable": Unavailable,
    "decryption_failed": Internal,
    "encryption_off": BadRequest,
}


def from_code(code: str, message: str = "", *, kind: str = "", **kwargs: Any) -> KefuError:
    """Rebuild the error a service raised from its ``code`` and ``kind`` (e.g. on the far side of the bus)."""
    cls = _BY_BASE_CODE.get(kind) or _BY_BASE_CODE.get(code) or _REFINED.get(code) or Internal
    if cls is RateLimited:
        return RateLimited(message, code=code, retry_after=float(kwargs.get("retry_after", 1.0)))
    return cls(message, code=code)


def from_headers(headers: dict[str, str] | None) -> KefuError | None:
    """The error carried by NATS reply headers, or None when the reply is a success."""
    if not headers or ERROR_CODE_HEADER not in headers:
        return None
    return from_code(
        headers[ERROR_CODE_HEADER],
        headers.get(ERROR_MESSAGE_HEADER, ""),
        kind=headers.get(ERROR_KIND_HEADER, ""),
        retry_after=headers.get(RETRY_AFTER_HEADER, "1"),
    )
