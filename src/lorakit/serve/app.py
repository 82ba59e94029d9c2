"""FastAPI routes: the OpenAI-compatible API, vLLM's adapter endpoints, /health, /metrics, /playground (also /)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .openai_api import OpenAIAPI
from .schemas import (APIError, ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest,
                      validation_error)

log = logging.getLogger("lorakit.serve")

OPEN_PATHS = ("/health", "/playground", "/", "/openapi.json")  # no API key needed (they hold no data; the page
# asks for the key)
MAX_BODY_BYTES = 8 << 20


def create_app(engine: Engine, metrics: ServerMetrics, api_key: Optional[str] = None) -> FastAPI:
    """The ASGI app; starts the engine thread on startup and stops it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if not engine.alive:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    api = OpenAIAPI(engine, metrics)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError):
        err = validation_error(list(exc.errors()), exc.body)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body": say which
            err = APIError(400, f"The request body is not valid JSON: it is not UTF-8 text ({exc.__cause__}).",
                           code="invalid_json")
            return JSONResponse(err.body(), status_code=400)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"Internal server error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "detail": "generation engine stopped"}, status_code=503)
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    @app.get("/playground")
    async def playground():
        page = resources.files("lorakit.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models():
        # Registry reads wait while the engine thread loads an adapter: keep them off the event loop.
        return {"object": "list", "data": await asyncio.to_thread(api.model_cards)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for card in await asyncio.to_thread(api.model_cards):
            if card["id"] == model_id:
                return card
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await api.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await api.chat(request, body)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadAdapterRequest):
        await api.engine_call(lambda: engine.registry.register(req.lora_name, req.lora_path))
        return {"status": "ok", "message": f"Adapter '{req.lora_name}' loaded.", "name": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadAdapterRequest):
        now = await api.engine_call(lambda: engine.registry.remove(req.lora_name))
        detail = "unloaded" if now else "will be unloaded when its running requests finish"
        return {"status": "ok", "message": f"Adapter '{req.lora_name}' {detail}.", "name": req.lora_name}

    return _Guard(app, metrics, api_key)


class _Guard:
    """ASGI wrapper: Bearer API key on every path but OPEN_PATHS, bodies up to MAX_BODY_BYTES, and a request
    counter per status."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
                 "/v1/unload_lora_adapter", "/health", "/metrics", "/playground")

    def __init__(self, app: FastAPI, metrics: ServerMetrics, api_key: Optional[str]):
        self.app, self.metrics, self.api_key = app, metrics, api_key
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in self.ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
                err = APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' "
                               "with the key given to --api-key.", code="invalid_api_key")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_counted)
            receive = await _read_body(scope, receive)
            if receive is None:
                err = APIError(413, f"The request body is larger than {MAX_BODY_BYTES >> 20} MiB.",
                               code="body_too_large")
                return await JSONResponse(err.body(), status_code=413)(scope, _disconnected, send_counted)
            return await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(endpoint, status["code"])

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False


async def _read_body(scope, receive):
    """The request's body read whole (None when it is over MAX_BODY_BYTES, declared or sent), and a `receive`
    that gives it to the app, then passes on what the client sends next (a disconnect)."""
    declared = dict(scope.get("headers", [])).get(b"content-length", b"")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: let the app see it
            chunks = None
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            break
    pending = [message if chunks is None else {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()
    return replay


async def _disconnected():
    return {"type": "http.disconnect"}
