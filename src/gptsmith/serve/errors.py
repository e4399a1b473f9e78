"""Every error a client sees is in OpenAI's shape, `{"error": {message, type, param, code}}`, with a 4xx for
bad requests; a crash is a 500 with a request id and no exception text (the traceback goes to the log)."""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptsmith.serve.schemas import APIError
from gptsmith.serve.server import internal_error

log = logging.getLogger("gptsmith.serve")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request.", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return (f"The request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}). Send a "
                "JSON object with Content-Type: application/json.", None)
    loc = [str(p) for p in e.get("loc", ())]
    if loc and loc[0] in ("body", "path", "query"):
        loc = loc[1:]
    param = ".".join(loc) or None
    if e.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if e.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return "The request body must be a JSON object (Content-Type: application/json).", None
    return f"Invalid value for '{param}': {e.get('msg')} (got {e.get('input')!r:.100}).", param


async def _api_error(request: Request, exc: APIError):
    return error_response(exc)


async def _validation(request: Request, exc: RequestValidationError):
    message, param = validation_message(exc)
    return error_response(APIError(400, message, param))


async def _http(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"Unknown URL {request.method} {request.url.path}; see GET /docs for the routes."
    return error_response(APIError(exc.status_code, msg, code=codes.get(exc.status_code)))


async def _crash(request: Request, exc: Exception):
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s: unhandled error on %s %s", request_id, request.method, request.url.path, exc_info=exc)
    return error_response(internal_error(request_id))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _crash)
