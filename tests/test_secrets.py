"""Passwords never printed, whatever characters they hold: a property over random
passwords, written into the URL as a user would (raw) and percent-encoded, through every
command that can name the database."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from executor.redact import mask_url, redact, remember
from tests.helpers import run_cli, write_jsonl

# Printable characters, the ones that end URL parts included (@ : / ? # % space); not '*',
# which the mask itself is made of.
ALPHABET = st.characters(
    min_codepoint=32, max_codepoint=0x2FF, blacklist_characters="*", blacklist_categories=("Cs",)
)
PASSWORDS = st.text(ALPHABET, min_size=6, max_size=24).filter(lambda p: p.strip() == p)


def commands(tmp_path: Path) -> list[tuple[str, ...]]:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    return [
        ("config", "show"),
        ("config", "show", "--json"),
        ("status",),
        ("status", "--json"),
        ("workers",),
        ("submit", str(prompts)),
        ("run", "--until-empty"),
        ("export", "1"),
        ("cancel", "1"),
        ("db", "upgrade"),
        ("db", "revision"),
        ("plan", "--job", "1"),
    ]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(password=PASSWORDS, encoded=st.booleans())
# Found by this property: an unencoded @ before a character that is no host name's, and
# one before a /, made the rest read as a host or a database.
@example(password="0000@\x80", encoded=False)
@example(password="ab@cd/ef", encoded=False)
def test_no_printed_line_holds_the_password(tmp_path, password, encoded):
    secret = quote(password, safe="") if encoded else password
    url = f"postgresql+psycopg://ex:{secret}@127.0.0.1:1/executor"
    for args in commands(tmp_path):
        done = run_cli(*args, env={"EXECUTOR_DB": url, "EXECUTOR_DEBUG": ""})
        printed = done.stdout + done.stderr
        assert password not in printed and secret not in printed, (args, printed)
        assert done.returncode != 1, (args, printed)  # never an internal error


@pytest.mark.parametrize(
    "url, shown, secrets",
    [
        ("postgresql+psycopg://ex:pass word@db/x", "postgresql+psycopg://ex:***@db/x",
         ["pass word"]),
        ("postgresql+psycopg://ex:pass/word@db/x", "postgresql+psycopg://ex:***@db/x",
         ["pass/word"]),
        ("postgresql+psycopg://ex:Hunter2@x:MySecretPass99/db@h/x", "postgresql+psycopg://***@h/x",
         ["Hunter2", "MySecretPass99"]),
        ("postgresql+psycopg://ex:p%40ssw0rd@db/x", "postgresql+psycopg://ex:***@db/x",
         ["p%40ssw0rd", "p@ssw0rd"]),
        ("postgresql+psycopg://db/x?password=hunter22", "postgresql+psycopg://db/x?password=***",
         ["hunter22"]),
        ("/home/me/executor.db", "/home/me/executor.db", []),
    ],
)  # fmt: skip
def test_urls_are_masked_by_their_structure_and_their_passwords_everywhere(url, shown, secrets):
    assert mask_url(url) == shown
    remember(url)
    said = redact(f"cannot reach {url}: refused; the server said {' '.join(secrets)!r}")
    assert not [s for s in secrets if s in said]
    assert said.startswith("cannot reach ")


def test_a_url_that_cannot_be_read_is_exit_2_with_the_encoding_hint(db_path):
    url = "postgresql+psycopg://ex:Hunter2@x:MySecretPass99/db@127.0.0.1/executor"
    done = run_cli("status", env={"EXECUTOR_DB": url})
    assert done.returncode == 2
    assert "cannot be read" in done.stderr and "%40" in done.stderr
    assert "Hunter2" not in done.stderr and "MySecretPass99" not in done.stderr
    shown = run_cli("config", "show", env={"EXECUTOR_DB": url}).stdout
    assert "MySecretPass99" not in shown and "postgresql+psycopg://***@127.0.0.1/executor" in shown


@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresql+psycopg://ex:0000@\x80@127.0.0.1:1/x", "cannot be read"),
        ("postgresql+psycopg://ex:ab@cd/ef@127.0.0.1:1/x", "cannot be read"),
        ("postgresql+psycopg://ex@\x80host/x", "names a host that cannot be one"),
    ],
)
def test_a_url_whose_host_cannot_be_one_is_exit_2(url, says):
    done = run_cli("status", env={"EXECUTOR_DB": url, "EXECUTOR_DEBUG": ""})
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "0000" not in done.stderr and "ab@cd" not in done.stderr
