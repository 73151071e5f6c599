"""Keeping secrets out of what is printed: database URLs carry passwords."""

from __future__ import annotations

import re

_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@"
)
_QUERY = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|sslpassword|secret|token)=)[^&\s]*")


def redact(text: str) -> str:
    """`text` with the password of any URL in it (user:password@, ?password=) replaced by
    ***, so that settings, errors and logs can be shown."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY.sub(lambda m: f"{m['key']}***", text)
