"""The FastAPI application: state, lifespan (the engine loop), API-key check, and running it with uvicorn."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from slam.api import errors, failover
from slam.api.janitor import Janitor, live_ids
from slam.api.limits import BodyLimit
from slam.api.loop import EngineLoop
from slam.api.metrics import Metrics
from slam.api.prepare import Preparer
from slam.api.requests import is_resume_path
from slam.api.requests import router as requests_router
from slam.api.routes import router
from slam.config import ServerSettings
from slam.engine.engine import LLMEngine

# Probes and scrapers carry no key; the schema is public so clients and fuzzers can read it.
OPEN_PATHS = {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def read_api_keys(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def create_app(settings: ServerSettings, engine: LLMEngine) -> FastAPI:
    metrics = Metrics(running=lambda: len(engine.scheduler.running), waiting=lambda: len(engine.scheduler.waiting))
    store, ckpt = failover.setup(settings, metrics.registry)
    loop = EngineLoop(engine, metrics, settings.max_queue, ckpt, resume_grace_s=settings.resume_grace_s)
    keys = read_api_keys(settings.api_key_file) if settings.api_key_file else None
    replica_token = settings.replica_token.get_secret_value()
    janitor = Janitor(store, settings, lambda: live_ids(engine)) if store is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        if janitor is not None:
            janitor.start()
        try:
            yield
        finally:
            if janitor is not None:
                janitor.stop()
            loop.stop()
            if ckpt is not None:
                ckpt.close(timeout=5.0)

    app = FastAPI(title="SLAM", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving with a compressed, bounded KV cache")
    app.state.loop = loop
    app.state.metrics = metrics
    app.state.store, app.state.checkpointer = store, ckpt
    app.state.public_url = settings.public_url
    app.state.settings = settings
    app.state.started = int(time.time())
    app.state.preparer = Preparer(engine, settings.served_model_name or engine.loaded.name, settings)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(router)
    app.include_router(requests_router)

    if keys is not None:
        @app.middleware("http")
        async def check_key(request: Request, call_next) -> Response:
            if request.url.path not in OPEN_PATHS:
                given = request.headers.get("authorization", "")
                token = given[7:].strip() if given.lower().startswith("bearer ") else ""
                # A peer replica proxying a resumed stream authenticates with the replica token, on those
                # routes only; the client's own key was checked by that replica.
                accepted = keys | ({replica_token} if replica_token and is_resume_path(request.url.path) else set())
                # compare_digest against each key: no timing hint about how much of a key matched
                if not token or not any(hmac.compare_digest(token.encode(), k.encode()) for k in accepted):
                    return errors.error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                                 None, "invalid_api_key")
            return await call_next(request)

    return app


def serve(settings: ServerSettings, engine: LLMEngine, timings: dict | None = None) -> None:
    import uvicorn

    app = create_app(settings, engine)
    timings = dict(timings or {})
    if settings.restore_slot is not None:
        # Before uvicorn starts: nothing is admitted (and /ready is not 200) until the slot is back.
        timings.update(failover.restore(engine, app.state.loop, app.state.store, app.state.checkpointer,
                                        settings.restore_slot))
        failover.report(timings)
    app.state.startup_timings = timings
    # A short graceful timeout: once the shutdown checkpoint is stored, open streams are cut (clients
    # resume elsewhere with Last-Event-ID) instead of holding the exit until they finish.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    DrainingServer(config, app.state.loop, settings.drain_timeout_s).run()


class DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT first stops admission and checkpoints every request (without
    checkpoints: lets running requests finish for up to `drain_timeout_s`), and only then lets uvicorn shut
    down (its own shutdown would otherwise wait for streams that never end)."""

    def __new__(cls, config, loop: EngineLoop, drain_timeout_s: float = 0.0):
        import uvicorn

        class _Server(uvicorn.Server):
            draining = False

            def handle_exit(self, sig, frame) -> None:
                if self.draining:  # a second signal: the usual uvicorn behaviour (SIGINT twice forces)
                    return super().handle_exit(sig, frame)
                self.draining = True
                loop.stop_admission(drain_timeout_s)  # 503 from now on, before the checkpoint even starts
                threading.Thread(target=self._drain, args=(sig, frame), name="slam-drain", daemon=True).start()

            def _drain(self, sig, frame) -> None:
                try:
                    loop.drain(failover.SHUTDOWN_CHECKPOINT_S, drain_timeout_s)
                finally:
                    super(_Server, self).handle_exit(sig, frame)

        return _Server(config)
