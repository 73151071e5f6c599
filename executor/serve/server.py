"""Starting the server: the checks before binding, then uvicorn."""

from __future__ import annotations

import ipaddress
import logging

from executor.config import Settings
from executor.errors import UsageError
from executor.serve.app import ServeOptions, create_app, files_folder
from executor.serve.files import FileStore
from executor.store import Database
from executor.units import parse_size

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(
    settings: Settings,
    db: Database,
    host: str,
    port: int,
    api_key: str | None,
    max_upload: str,
) -> None:
    """Run until SIGTERM/Ctrl-C. Refuses a non-loopback bind without an API key."""
    import uvicorn

    if api_key is not None and len(api_key) < 8:
        raise UsageError("--api-key: at least 8 characters (a long random one is best)")
    if not is_loopback(host) and not api_key:
        raise UsageError(
            f"binding to {host} makes the API reachable from other machines",
            hint="set --api-key (or EXECUTOR_API_KEY), or bind 127.0.0.1",
        )
    try:
        limit = parse_size(max_upload)
    except ValueError as exc:
        raise UsageError(f"--max-upload: {exc}") from None
    files = FileStore(files_folder(settings))
    app = create_app(settings, db, files, ServeOptions(api_key=api_key, max_upload=limit))
    log.info("serving http://%s:%d/ (files in %s)", host, port, files.folder)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
