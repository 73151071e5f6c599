"""The HTTP routes of `executor serve`: OpenAI's Files and Batch endpoints, the status page.

Plain functions on one router; what they share (settings, database, file store, limits)
comes from `Served`, set on the app by `create_app`. Ids are opaque and checked by shape
before any lookup; file bytes are named by row number, never by what a client sent.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from executor.config import Settings
from executor.planning.estimate import Estimator
from executor.serve import batches as service
from executor.serve import page
from executor.serve.batches import ApiError
from executor.serve.files import BadUpload, FileStore, Upload, UploadTooLarge
from executor.serve.guard import BodyTooLarge
from executor.store import Database
from executor.store import api as store

log = logging.getLogger(__name__)

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")

router = APIRouter()


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None
    max_upload: int  # bytes
    housekeeping_seconds: float = 0.5


@dataclass(frozen=True)
class Served:
    """What every route works with."""

    settings: Settings
    db: Database
    files: FileStore
    options: ServeOptions


def served(request: Request) -> Served:
    return request.app.state.served


# --- files ---


@router.post("/v1/files")
async def upload(request: Request, s: Served = Depends(served)) -> dict[str, Any]:
    """Stream the `file` part to disk as it arrives; nothing is kept unless all of it came."""
    db, files = s.db, s.files
    row = await run_in_threadpool(store.reserve_file, db, filename="upload", purpose="batch")
    try:
        with files.open_new(row.id) as sink:
            form = Upload(request.headers.get("content-type", ""), sink, s.options.max_upload)
            await form.feed(request.stream())
        if form.fields.get("purpose") != "batch":
            raise ApiError(
                400, "purpose must be 'batch' (the one this server takes)", param="purpose"
            )
        await run_in_threadpool(store.finish_file, db, row.id, form.size)
    except (UploadTooLarge, BodyTooLarge) as exc:
        await _discard(db, files, row.id)
        raise ApiError(413, str(exc)) from None
    except BadUpload as exc:
        await _discard(db, files, row.id)
        raise ApiError(400, str(exc)) from None
    except ClientDisconnect:
        await _discard(db, files, row.id)
        log.info("an upload was cut off by its client; nothing was kept")
        raise ApiError(400, "the upload was cut off before it ended; nothing was kept") from None
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


@router.get("/v1/files")
def list_files(
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: str = "desc",
    s: Served = Depends(served),
) -> dict[str, Any]:
    if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
        raise ApiError(400, "limit is 1..10000 and order asc or desc")
    rows = store.list_files(
        s.db, purpose=purpose, limit=limit + 1, after=after, newest_first=order == "desc"
    )
    return _page([service.file_object(f) for f in rows[:limit]], len(rows) > limit)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, s: Served = Depends(served)) -> dict[str, Any]:
    return service.file_object(_file(s.db, file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, s: Served = Depends(served)) -> dict[str, Any]:
    _file(s.db, file_id)
    gone = store.delete_file(s.db, file_id)
    if gone is None:
        raise ApiError(404, f"No such File object: {file_id}", param="file_id")
    s.files.remove(gone.id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content")
def content(file_id: str, s: Served = Depends(served)) -> FileResponse:
    found = _file(s.db, file_id)
    path = s.files.path(found.id)
    if not path.is_file():
        log.error("file %s: its content is missing from %s", file_id, s.files.folder)
        raise ApiError(
            404,
            f"the content of {file_id} is missing on the server (its bytes were removed)",
            param="file_id",
        )
    return FileResponse(path, media_type="application/octet-stream", filename=found.filename)


# --- batches ---


@router.post("/v1/batches")
async def create_batch(request: Request, s: Served = Depends(served)) -> dict[str, Any]:
    body = await _json_object(request)
    # Validation reads the whole input file: off the event loop.
    batch = await run_in_threadpool(service.create_batch, s.db, s.settings, s.files, body)
    return await run_in_threadpool(service.batch_object, s.db, batch)


@router.get("/v1/batches")
def list_batches(
    limit: int = 20, after: str | None = None, s: Served = Depends(served)
) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit is 1..100", param="limit")
    rows = store.list_batches(s.db, limit=limit + 1, after=after)
    return _page([service.batch_object(s.db, b) for b in rows[:limit]], len(rows) > limit)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, s: Served = Depends(served)) -> dict[str, Any]:
    return service.batch_object(s.db, _batch(s.db, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, s: Served = Depends(served)) -> dict[str, Any]:
    return service.batch_object(s.db, service.cancel(s.db, _batch(s.db, batch_id)))


# --- the page ---


@router.get("/", response_class=HTMLResponse)
def index(s: Served = Depends(served)) -> str:
    snap = page.snapshot(s.db, s.settings.lease_seconds, Estimator(s.settings, s.db))
    return page.page(page.render_sections(snap))


@router.get("/api/status")
def status(html: int = 0, s: Served = Depends(served)) -> dict[str, Any]:
    data = page.snapshot(s.db, s.settings.lease_seconds, Estimator(s.settings, s.db))
    if html:
        data["html"] = page.render_sections(data)
    return data


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in page.STATIC:
        raise ApiError(404, "not found")
    media, text = page.STATIC[name]
    return Response(text, media_type=media)


# --- helpers ---


async def _json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object, read within the guard's limit."""
    try:
        raw = await request.body()
    except BodyTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(
            400, "the request body is not valid JSON (send a JSON object, Content-Type: "
            "application/json)",
        ) from None  # fmt: skip
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


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
