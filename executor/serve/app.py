"""`executor serve`: OpenAI's Files and Batch endpoints and a status page, over the queue.

The server talks to the database and the file store only; the model runs in `executor run`
workers (one or many, SQLite or PostgreSQL), never here. Ids are opaque and checked by
shape before any lookup; file bytes are named by row number. With an API key every route,
the page included, wants it (a bearer token, or Basic auth's password for a browser).
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from executor.config import Settings
from executor.serve import batches as service
from executor.serve import page
from executor.serve.batches import ApiError
from executor.serve.files import BadUpload, FileStore, Upload, UploadTooLarge
from executor.store import Database
from executor.store import api as store

log = logging.getLogger(__name__)

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
}


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None
    max_upload: int  # bytes
    housekeeping_seconds: float = 0.5


def create_app(
    settings: Settings, db: Database, files: FileStore, options: ServeOptions
) -> FastAPI:
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
        title="executor",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        dependencies=[Depends(_authorizer(options.api_key))],
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Basic realm="executor"'} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request body"
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[..., Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    # --- files ---

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > options.max_upload + 64 * 1024:
            raise ApiError(413, f"the upload is over the {options.max_upload:,}-byte limit")
        row = await run_in_threadpool(store.reserve_file, db, filename="upload", purpose="batch")
        try:
            with files.open_new(row.id) as sink:
                form = Upload(request.headers.get("content-type", ""), sink, options.max_upload)
                await form.feed(request.stream())
            purpose = form.fields.get("purpose")
            if purpose != "batch":
                raise ApiError(
                    400, "purpose must be 'batch' (the one this server takes)", param="purpose"
                )
            await run_in_threadpool(store.finish_file, db, row.id, form.size)
        except UploadTooLarge as exc:
            await _discard(db, files, row.id)
            raise ApiError(413, str(exc)) from None
        except BadUpload as exc:
            await _discard(db, files, row.id)
            raise ApiError(400, str(exc)) from None
        except OSError as exc:  # a full disk, a folder that is not writable
            await _discard(db, files, row.id)
            log.error("upload not stored: %s", exc)
            raise ApiError(507, f"the server could not store the file: {exc.strerror}") from None
        except BaseException:
            await _discard(db, files, row.id)
            raise
        await run_in_threadpool(store.rename_file, db, row.id, form.filename or "upload.jsonl")
        found = await run_in_threadpool(store.get_file, db, row.public_id)
        assert found is not None
        return service.file_object(found)

    @app.get("/v1/files")
    def list_files(
        purpose: str | None = None,
        limit: int = 10000,
        after: str | None = None,
        order: str = "desc",
    ) -> dict[str, Any]:
        if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
            raise ApiError(400, "limit is 1..10000 and order asc or desc")
        rows = store.list_files(
            db, purpose=purpose, limit=limit + 1, after=after, newest_first=order == "desc"
        )
        return _page([service.file_object(f) for f in rows[:limit]], len(rows) > limit)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return service.file_object(_file(db, file_id))

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        _file(db, file_id)
        gone = store.delete_file(db, file_id)
        if gone is None:
            raise ApiError(404, f"No such File object: {file_id}", param="file_id")
        files.remove(gone.id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    def content(file_id: str) -> FileResponse:
        found = _file(db, file_id)
        return FileResponse(
            files.path(found.id), media_type="application/octet-stream", filename=found.filename
        )

    # --- batches ---

    @app.post("/v1/batches")
    def create_batch(body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(
            set(body)
            - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        )
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}", param=unknown[0])
        batch = service.create_batch(
            db,
            body.get("input_file_id"),
            body.get("endpoint"),
            body.get("completion_window"),
            body.get("metadata"),
        )
        return service.batch_object(db, batch)

    @app.get("/v1/batches")
    def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit is 1..100", param="limit")
        rows = store.list_batches(db, limit=limit + 1, after=after)
        return _page([service.batch_object(db, b) for b in rows[:limit]], len(rows) > limit)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> dict[str, Any]:
        return service.batch_object(db, _batch(db, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        return service.batch_object(db, service.cancel(db, _batch(db, batch_id)))

    # --- the page ---

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page.page(page.render_sections(page.snapshot(db, settings.lease_seconds)))

    @app.get("/api/status")
    def status(html: int = 0) -> dict[str, Any]:
        data = page.snapshot(db, settings.lease_seconds)
        if html:
            data["html"] = page.render_sections(data)
        return data

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in page.STATIC:
            raise ApiError(404, "not found")
        media, text = page.STATIC[name]
        return Response(text, media_type=media)

    @app.exception_handler(404)
    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, "not found").body(), status_code=404)

    return app


def _authorizer(key: str | None) -> Callable[[Request], None]:
    """Every route's check: the key as a bearer token or Basic auth's password."""

    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                value = ""
        elif scheme.lower() != "bearer":
            value = ""
        if not hmac.compare_digest(value.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)")

    return check


def _file(db: Database, file_id: str) -> store.ApiFile:
    found = store.get_file(db, file_id) if FILE_ID.fullmatch(file_id) else None
    if found is None:
        raise ApiError(404, f"No such File object: {file_id[:64]}", param="file_id")
    return found


def _batch(db: Database, batch_id: str) -> store.ApiBatch:
    found = store.get_batch(db, batch_id) if BATCH_ID.fullmatch(batch_id) else None
    if found is None:
        raise ApiError(404, f"No such Batch object: {batch_id[:64]}", param="batch_id")
    return found


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


async def _discard(db: Database, files: FileStore, row_id: int) -> None:
    files.remove(row_id)
    await run_in_threadpool(store.drop_file, db, row_id)


def _housekeeping(
    db: Database,
    settings: Settings,
    files: FileStore,
    options: ServeOptions,
    stop: threading.Event,
) -> None:
    """Validate new batches and finalize finished ones, until the server stops."""
    while not stop.is_set():
        try:
            moved = service.housekeeping(db, settings, files)
        except Exception:  # a database hiccup must not end the thread; say it and go on
            log.exception("batch housekeeping failed; trying again")
            moved = 0
        if not moved:
            stop.wait(options.housekeeping_seconds)


def files_folder(settings: Settings) -> Path:
    """Uploaded and produced files: beside a SQLite database, else in the data folder."""
    from executor.config import xdg_dir

    url = settings.db_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent / "files"
    return xdg_dir("DATA") / "files"
