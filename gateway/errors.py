"""OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import orjson

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    502: "api_error",
    503: "service_unavailable",
    504: "api_error",
}


class GatewayError(Exception):
    """A refusal, answered as OpenAI's error JSON; ``headers`` are added (Retry-After, x-ratelimit-*)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or []

    def body(self) -> bytes:
        error = {"message": self.message, "type": TYPES.get(self.status, "api_error"), "param": self.param,
                 "code": self.code}  # fmt: skip
        return orjson.dumps({"error": error})
