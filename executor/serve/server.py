"""Starting the server: the checks before binding, then uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from executor.config import Settings
from executor.errors import UsageError
from executor.serve.app import create_app, files_folder
from executor.serve.files import FileStore
from executor.serve.routes import ServeOptions
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


def _check_port(host: str, port: int) -> None:
    """A port in use is the user's to fix, said in one line (uvicorn would exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            in_use = exc.errno == errno.EADDRINUSE
            raise UsageError(
                f"cannot listen on {host}:{port}: {exc.strerror}",
                hint="another `executor serve` (or program) has it: pick one with --port"
                if in_use
                else "--host must be an address (or name) of this machine, e.g. 127.0.0.1",
            ) from None


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

    if api_key is not None and (len(api_key) < 8 or not api_key.isprintable() or " " in api_key):
        raise UsageError(
            "--api-key: at least 8 characters, no spaces or control characters "
            "(a long random one is best: python3 -c 'import secrets; print(secrets.token_hex())')"
        )
    if not is_loopback(host) and not api_key:
        raise UsageError(
            f"binding to {host} makes the API reachable from other machines",
            hint="set --api-key (or EXECUTOR_API_KEY), or bind 127.0.0.1",
        )
    try:
        limit = parse_size(max_upload)
    except ValueError as exc:
        raise UsageError(f"--max-upload: {exc}") from None
    _check_port(host, port)
    files = FileStore(files_folder(settings))
    app = create_app(settings, db, files, ServeOptions(api_key=api_key, max_upload=limit))
    log.info("serving http://%s:%d/ (files in %s)", host, port, files.folder)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
