"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Validation problems are 400 (never FastAPI's 422), unknown routes 404, internal faults 500 with
the detail in the server log rather than in the response.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error a handler answers with; `headers` e.g. Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": RETRY_AFTER_S})


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse_error(err: APIError) -> str:
    """An error after streaming began: one `data:` event with the error (then `[DONE]`)."""
    return f"data: {json.dumps(err.body())}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such route", 405: "method not allowed on this route"}.get(
            exc.status_code, str(exc.detail)
        )
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(
            error_body(500, f"internal server error ({type(exc).__name__}); see the server log"),
            status_code=500,
        )


def validation_error(errors: list[Any]) -> APIError:
    """The first pydantic error as a 400 naming the parameter and what was wrong."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return bad_request(
            "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", ""))
        )
    if not loc and kind in ("missing", "model_attributes_type", "dict_type"):
        return bad_request(
            "the request body must be a JSON object (sent with Content-Type: application/json)"
        )
    # Union members add their type name to the location; keep only the field path.
    path = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(path) or None
    if kind == "invalid_text":  # protocol._Request: the path of the bad string is in ctx
        param = err.get("ctx", {}).get("param") or None
        return bad_request(str(err.get("msg", "invalid text")), param=param, code="invalid_text")
    if kind == "extra_forbidden":
        return bad_request(
            f"unknown parameter {param!r}; remove it (see /docs for the accepted fields)",
            param=param,
            code="unknown_parameter",
        )
    return bad_request(f"{param or 'body'}: {err.get('msg', 'invalid value')}", param=param)


def _is_type_tag(part: str) -> bool:
    return (
        part in ("str", "int", "float", "bool", "list[int]", "list[str]")
        or ("[" in part and "]" in part)
        or part.startswith("function-")
        or part in ("constrained-int", "ChatMessage")
    )
