"""Errors as RFC 9457 problem details (``application/problem+json``).

Every refusal carries the same machine-readable ``code`` the CLI and the Python API use
(``shared.errors``), plus ``field`` where one field is to blame, so a client branches on
the code whatever language it is written in. Nothing else ever reaches a client: an
unexpected error is answered with a bare 500 problem (its traceback goes to the log only).
"""

from __future__ import annotations

import math

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from shared.errors import (
    BrokerUnavailable,
    InvalidInput,
    JobNotFound,
    QueueFull,
    RefineryError,
    StorageUnavailable,
)

MEDIA_TYPE = "application/problem+json"


class Unauthorized(RefineryError):
    """No API key, a malformed one, an unknown one or a revoked one: all look the same."""

    code = "unauthorized"


class RateLimited(RefineryError):
    """The tenant submits faster than its key's rate."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, field="rate")
        self.retry_after_s = retry_after_s


class QueuedCapReached(RefineryError):
    """The tenant already has as many queued jobs as its key allows."""

    code = "max_queued"


class BodyTooLarge(InvalidInput):
    code = "body_too_large"


class RequestTimeout(RefineryError):
    """The request body did not arrive in time (``producer.gateway.app.read_body``)."""

    code = "request_timeout"


class StreamsExhausted(RefineryError):
    """This replica already follows as many event streams as it may."""

    code = "too_many_streams"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class Problem(BaseModel):
    """RFC 9457 problem details, with this service's ``code`` and ``field`` members."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None


# Most specific first: the first class an error is an instance of decides its status.
_STATUS: list[tuple[type[RefineryError], int]] = [
    (BodyTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InvalidInput, 400),
    (Unauthorized, 401),
    (RequestTimeout, 408),
    (JobNotFound, 404),
    (RateLimited, 429),
    (QueuedCapReached, 429),
    (QueueFull, 429),
    (BrokerUnavailable, 503),
    (StorageUnavailable, 503),
    (StreamsExhausted, 503),
]

# How long a client refused for load (not for its own rate) should wait before retrying.
RETRY_LOAD_S = 1


def status_of(error: RefineryError) -> int:
    return next((status for cls, status in _STATUS if isinstance(error, cls)), 500)


def problem(error: RefineryError) -> Problem:
    status = status_of(error)
    return Problem(
        type=f"urn:face-refinery:problem:{error.code}",
        title=error.code.replace("_", " "),
        status=status,
        detail=error.message,
        code=error.code,
        field=error.field,
    )


def retry_after(error: RefineryError) -> int | None:
    """Whole seconds for ``Retry-After`` (RFC 9110 allows no fractions), or None."""
    if isinstance(error, RateLimited):
        return max(1, math.ceil(error.retry_after_s))
    if status_of(error) in (429, 503):
        return RETRY_LOAD_S
    return None


def response(error: RefineryError) -> JSONResponse:
    body = problem(error)
    headers = {}
    if (seconds := retry_after(error)) is not None:
        headers["Retry-After"] = str(seconds)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="refinery"'
    if isinstance(error, BodyTooLarge | RequestTimeout):
        # The rest of the body is not read: the connection cannot carry another request.
        headers["Connection"] = "close"
    return JSONResponse(body.model_dump(), status_code=body.status, headers=headers, media_type=MEDIA_TYPE)


def install(app: FastAPI) -> None:
    """Route every error the app can meet through ``response``."""

    @app.exception_handler(RefineryError)
    async def _typed(request: Request, exc: RefineryError) -> JSONResponse:
        return response(exc)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        # What the producer's own calls raise as BrokerUnavailable, for the gateway's direct
        # reads of Redis (keys, quotas, records).
        return response(BrokerUnavailable(f"Redis unreachable ({exc})", field="redis"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A malformed query parameter or header, as the contract's own checks would word it.
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"][1:]) or None
        return response(InvalidInput(first["msg"], field=field))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals: no such route (404), wrong method (405).
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = Problem(
            type=f"urn:face-refinery:problem:{code}",
            title=code.replace("_", " "),
            status=exc.status_code,
            detail=str(exc.detail),
            code=code,
        )
        return JSONResponse(body.model_dump(), status_code=exc.status_code, media_type=MEDIA_TYPE)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette raises it again after this answer, and uvicorn logs its traceback.
        return response(RefineryError("internal error; the gateway logged it"))
