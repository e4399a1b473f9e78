"""`gptsmith serve`: an OpenAI-compatible API, a web chat UI and the store behind both.

    gptsmith serve --model runs/sft --port 8000                       # local model, continuous batching
    gptsmith serve --backend-url http://localhost:11434/v1            # front Ollama / vLLM / a hosted API
    gptsmith serve --assistant pydocs.yaml notes.yaml [--model DIR] [--watch]   # assistants, each its own model
    gptsmith serve --registry reg                                     # a model registry's live version, followed

This module assembles the app: backend, store, the Server that holds the serving logic (server.py, streams.py),
the routers (routes/openai.py, routes/ui.py, routes/arena.py, routes/auth.py), middleware and error handlers
(errors.py). Every answer, from the UI or from /v1, is written to the store while it streams (when, exactly:
server.py), so a server killed mid-answer still holds the question and the partial answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from gptsmith.config import ProjectConfig
from gptsmith.errors import InputError
from gptsmith.serve.auth import Auth, Guard
from gptsmith.serve.backends import Backend, ExternalBackend, LocalBackend, model_version
from gptsmith.serve.errors import add_error_handlers
from gptsmith.serve.routes import arena, auth, openai, ui
from gptsmith.serve.security import RequestShield
from gptsmith.serve.embeddings import Embedders
from gptsmith.serve.registry_watch import InFlight, RegistryWatcher
from gptsmith.serve.server import Served, Server
from gptsmith.serve.watch import IndexWatcher
from gptsmith.serve.store import Store

log = logging.getLogger("gptsmith.serve")
STATIC = Path(__file__).parent / "static"


def set_torch_threads(n: int) -> int:
    """Torch's CPU thread pool busy-waits between ops; when it spans every core it spins against the event
    loop thread (and anything else on the machine), and on a 2-core box that made 16 streams cost 2-3x more
    CPU per token and, under outside load, decode 10-50x slower (benchmarks/bench_serve.py --torch-threads).
    Auto (0) keeps one core free for the event loop."""
    import torch

    if n <= 0:
        n = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
    torch.set_num_threads(n)
    log.info("torch CPU threads: %d", n)
    return n


def build_backend(cfg: ProjectConfig, model_dir=None, engine=None, name: str | None = None,
                  version: str | None = None) -> Backend:
    """`name` and `version` (both; serve --registry: the registry's name, "v3") replace the folder's name and
    the hash of its files."""
    sc = cfg.serve
    if sc.backend_url:
        return ExternalBackend(sc.backend_url, os.environ.get("GPTSMITH_BACKEND_API_KEY"), sc.backend_model)
    if engine is None:
        if model_dir is None:
            raise ValueError("serve needs a model directory (--model) or a backend URL (--backend-url)")
        from gptsmith.engine import Engine
        engine = Engine.load(model_dir, device=sc.device)
        if engine.device.type == "cpu":
            set_torch_threads(sc.torch_threads)
    if name is None or version is None:
        if model_dir is not None:
            name, version = Path(model_dir).resolve().name, model_version(Path(model_dir))
        else:
            name = Path(str(getattr(engine.model.config, "name_or_path", "") or "model")).name or "model"
            version = name
    g = cfg.generate
    return LocalBackend(engine, name, version, sc.max_batch_size, top_k=g.top_k,
                        repetition_penalty=g.repetition_penalty, stream_interval=sc.stream_interval_s)


def build_served(cfg: ProjectConfig, model_dir=None, engine=None, backend: Backend | None = None,
                 assistants=()) -> list[Served]:
    """The plain model (when --model, --backend-url, an engine or a backend is given) and each assistant, as
    served names. Assistants over the same model directory (or over --model's) share one backend."""
    served: list[Served] = []
    local: dict[Path, Backend] = {}  # resolved model directory -> its one backend
    if backend is not None or engine is not None or model_dir is not None or cfg.serve.backend_url:
        backend = backend or build_backend(cfg, model_dir, engine)
        if model_dir is not None and not cfg.serve.backend_url:
            local[Path(model_dir).resolve()] = backend
        served.append(Served(backend))
    for path in assistants:
        from gptsmith.assist import Assistant, load_assistant

        profile = load_assistant(path)
        if profile.backend_url:
            b = ExternalBackend(profile.backend_url, os.environ.get(profile.api_key_env), profile.backend_model)
        else:
            where = Path(profile.model).resolve()
            if where not in local:
                local[where] = build_backend(cfg.model_copy(update={"serve": cfg.serve.model_copy(
                    update={"backend_url": None})}), where)
            b = local[where]
        served.append(Served(b, Assistant.open(profile), profile.name, index_dir(profile)))
    names = [s.name for s in served if s.name]  # an external plain model's name is known once it has started
    if len(set(names)) != len(names):
        raise InputError(f"two served models are named the same ({', '.join(names)}): give each assistant its own "
                         "`name` (the model name clients ask for), not the model folder's name either")
    if not served:
        raise InputError("serve needs a model directory (--model), a backend URL (--backend-url) or an assistant "
                         "(--assistant FILE)")
    return served


def index_dir(profile) -> str | None:
    """The assistant's RAG index directory, as the folder watch refreshes it; None without RAG."""
    return str(Path(profile.rag.index).resolve()) if profile.rag is not None else None


def create_app(cfg: ProjectConfig, model_dir=None, engine=None, backend: Backend | None = None,
               assistants=()) -> FastAPI:
    """The whole server as an ASGI app. `engine` (an already loaded gptsmith Engine) skips loading
    `model_dir`; `backend` replaces both (tests, other backends); `assistants` are assistant YAML files, each
    served as its own model name."""
    sc = cfg.serve
    registry = registry_watcher(cfg, model_dir, engine, backend)  # serve --registry: its live version, followed
    backend = registry.backend if registry else backend
    store = Store(sc.db)
    srv = Server(cfg, None, store, build_served(cfg, model_dir, engine, backend, assistants))
    if registry:
        registry.attach(srv)
    srv.embedders = Embedders(srv.served)
    srv.watcher = IndexWatcher(srv.served, sc.watch_seconds)

    @asynccontextmanager
    async def lifespan(app):
        for b in srv.backends:
            await b.start()
        for s in srv.served:
            log.info("serving %s (%s); store %s", s.name, s.backend.version, sc.db)
        if sc.watch:
            srv.watcher.start()
        if registry:
            registry.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            srv.watcher.stop()
            if registry:
                await registry.stop()
            await srv.close()
            for b in srv.backends:
                await b.close()
            store.close()

    app = FastAPI(title="gptsmith", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = srv
    app.state.auth = Auth(sc.api_key, sc.session_hours, sc.auth_failures_per_minute)
    # middleware: the only place it is added; the last added is the outermost
    if registry:  # innermost: counts the requests a version switch must let finish
        app.add_middleware(InFlight, epochs=registry.epochs)
    app.add_middleware(Guard, auth=app.state.auth, max_body_bytes=sc.max_body_bytes,
                       rate_limit_per_minute=sc.rate_limit_per_minute)
    if sc.cors_origins:  # outside Guard, so preflight requests are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=sc.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    # outermost: Host (DNS rebinding), Origin (cross-site writes) and JSON content type before anything else
    app.add_middleware(RequestShield, allowed_hosts=sc.allowed_hosts, cors_origins=sc.cors_origins)
    add_error_handlers(app)
    for router in (openai.router, ui.router, arena.router, auth.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def registry_watcher(cfg: ProjectConfig, model_dir, engine, backend) -> RegistryWatcher | None:
    """serve --registry: the watcher holding the registry's live version (loaded); None without a registry."""
    if not cfg.serve.registry:
        return None
    if model_dir is not None or engine is not None or backend is not None or cfg.serve.backend_url:
        raise InputError("serve --registry serves the registry's live version: leave out --model and "
                         "--backend-url (assistants may still be added with --assistant)")
    return RegistryWatcher.open(cfg)


def serve(model_dir, cfg: ProjectConfig, assistants=()) -> None:
    """Run the server (blocking) on cfg.serve.host:port."""
    import uvicorn

    sc = cfg.serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sc.host not in ("127.0.0.1", "localhost", "::1") and not sc.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model and "
                    "read the stored conversations; set --api-key or GPTSMITH_API_KEY", sc.host)
    if sc.backend_url:
        from gptsmith.serve.backends import check_backend
        check_backend(sc.backend_url, os.environ.get("GPTSMITH_BACKEND_API_KEY"))
    app = create_app(cfg, model_dir, assistants=assistants)
    name = ", ".join(s.name or sc.backend_url for s in app.state.server.served)
    print(f"gptsmith serve: {name} on http://{sc.host}:{sc.port}  (chat UI at /, OpenAI API at /v1, store {sc.db})",
          flush=True)
    uvicorn.run(app, host=sc.host, port=sc.port, log_level="info", timeout_graceful_shutdown=5)
