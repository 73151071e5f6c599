"""`executor serve`: OpenAI's Files and Batch endpoints and a status page, over the queue.

The server talks to the database and the file store only; the model runs in `executor run`
workers (one or many, SQLite or PostgreSQL), never here. With an API key every route, the
page included, wants it (a bearer token, or Basic auth's password for a browser): the
guard checks it before any body is read. Routes live in routes.py; a housekeeping thread
takes up batches a stopped server left and writes finished batches' files.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from executor.config import Settings, xdg_dir
from executor.serve import batches as service
from executor.serve.batches import ApiError
from executor.serve.files import FileStore
from executor.serve.guard import Guard
from executor.serve.routes import Served, ServeOptions, router
from executor.store import Database

log = logging.getLogger(__name__)

ERROR_PAUSE = 5.0  # after a failed housekeeping round (the database away): one line per pause

__all__ = ["ServeOptions", "create_app", "files_folder"]


def create_app(settings: Settings, db: Database, files: FileStore, options: ServeOptions) -> Guard:
    """The ASGI application: the guard in front of the FastAPI app."""
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(
            target=_housekeeping, args=(db, settings, files, options, stop), daemon=True
        )
        thread.start()
        yield
        stop.set()
        thread.join(10)

    app = FastAPI(
        title="executor", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.served = Served(settings, db, files, options)
    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(404)
    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, "not found").body(), status_code=404)

    return Guard(app, api_key=options.api_key, upload_limit=options.max_upload)


def _housekeeping(
    db: Database,
    settings: Settings,
    files: FileStore,
    options: ServeOptions,
    stop: threading.Event,
) -> None:
    """Take up and finalize batches, until the server stops."""
    while not stop.is_set():
        try:
            moved = service.housekeeping(db, settings, files)
        except Exception as exc:  # a database hiccup must not end the thread; say it, go on
            log.error(
                "batch housekeeping failed (%s: %s); trying again in %gs",
                type(exc).__name__, exc, ERROR_PAUSE,
            )  # fmt: skip
            stop.wait(ERROR_PAUSE)
            continue
        if not moved:
            stop.wait(options.housekeeping_seconds)


def files_folder(settings: Settings) -> Path:
    """Uploaded and produced files: beside a SQLite database, else in the data folder."""
    url = settings.db_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent / "files"
    return xdg_dir("data") / "files"
