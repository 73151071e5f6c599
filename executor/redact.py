"""What may be printed: database URLs carry passwords, and user text may carry terminal codes.

Passwords are masked three ways, so that none survives whatever its characters: the URL a
setting holds is masked by its structure (`mask_url`: SQLAlchemy's reading of it, or, when
it cannot be read, everything between `://` and the last `@`); any text printed has URLs in it
masked the same way and query passwords (`?password=`) too (`redact`); and every password of a
configured URL (`remember`) is masked wherever it appears, spaces, slashes and `@` included —
an error message that quotes it, a driver's message, a log line.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, unquote

MIN_SECRET = 4  # shorter passwords are masked where they stand in URLs, not everywhere
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s]*)@")
_QUERY = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|sslpassword|secret|token)=)[^&\s]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_known: set[str] = set()


def remember(url: str | None) -> None:
    """Mask the passwords of `url` (its user part's, as SQLAlchemy reads it and as it was
    meant, and a `?password=` one; percent-encoded and decoded) in everything `redact` sees
    from now on."""
    if not url or "://" not in url:
        return
    rest = url.split("://", 1)[1]
    found = [m[0].split("=", 1)[1] for m in _QUERY.finditer(rest)]
    userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
    if ":" in userinfo:
        meant = userinfo.split(":", 1)[1]  # up to the last @: what the user typed
        # What a parser that stops at a URL delimiter takes for the password, port or path:
        # a message about such a misreading quotes the piece ("invalid port 'Secret99'").
        found += [meant, *re.split(r"[@:/?#]", meant)]
    for secret in found:
        plain = unquote(secret)
        for form in {secret, plain, quote(plain, safe=""), json.dumps(plain)[1:-1]}:
            if len(form) >= MIN_SECRET:
                _known.add(form)


def mask_url(url: str) -> str:
    """A URL with its password (or, when it cannot be told from the user name, the whole
    user part) replaced by ***."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        if ":" in userinfo:
            user, password = userinfo.split(":", 1)
            # An @ in the password: where it ends is ambiguous, so the user goes too.
            userinfo = "***" if "@" in password else f"{user}:***"
        rest = f"{userinfo}@{host}"
    return _QUERY.sub(lambda m: f"{m['key']}***", f"{scheme}://{rest}")


def redact(text: str) -> str:
    """`text` with every password masked: remembered ones wherever they stand, and those of
    URLs and query strings in it."""
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _URL.sub(lambda m: _mask_userinfo(m["scheme"], m["userinfo"]), text)
    return _QUERY.sub(lambda m: f"{m['key']}***", text)


def _mask_userinfo(scheme: str, userinfo: str) -> str:
    if ":" not in userinfo:
        return f"{scheme}{userinfo}@"
    user, password = userinfo.split(":", 1)
    return f"{scheme}***@" if "@" in password else f"{scheme}{user}:***@"


def printable(text: str, *, lines: bool = False) -> str:
    """User text safe to put on a terminal: control characters (escape sequences, carriage
    returns) shown as escapes instead of acting; newlines too, unless `lines` (a message
    that is meant to span lines)."""
    escaped = _CONTROL.sub(_escape, text)
    return escaped if lines else escaped.replace("\n", "\\n")


def _escape(match: re.Match[str]) -> str:
    return match[0].encode("unicode_escape").decode("ascii")
