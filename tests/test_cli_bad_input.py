"""The bad-input table of docs/failure-model.md: each row is run here, and the table is checked.

Each row is an input (a command line, an environment, or a Python call), the error it must
give, the exit status, and how fast it must fail:

* "at once": run with ``--retry-deadline 5s`` (or its default for Python calls); it must fail
  before that deadline, and without a "retrying" warning — a permanent error is not retried;
* "after the retry deadline": run with ``--retry-deadline 1s``; it must give up with 69, not
  before the deadline (a lower bound: retries really happened).

Name lookups never leave the machine: every command runs with ``socket.getaddrinfo`` answering
"name not known" for ``*.invalid`` names (what a DNS server says for a typo), so the DNS row
sends no query. ``COORDLOCK_WRITE_DOCS=1`` rewrites the table in the page from these rows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import cli_env

from coordlock.testing.servers import PostgresServer, RedisServer, ServerUnavailable, free_port

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "failure-model.md"
START = "<!-- bad-input-table: generated from tests/test_cli_bad_input.py -->"
END = "<!-- /bad-input-table -->"
AT_ONCE, AFTER_RETRIES = "at once", "after the retry deadline (`--retry-deadline`, default 10 s)"
AT_ONCE_DEADLINE = 5.0

FAKE_DNS = textwrap.dedent(
    """
    import socket, sys
    _real = socket.getaddrinfo
    def _getaddrinfo(host, *args, **kwargs):
        if isinstance(host, (str, bytes)) and str(host).rstrip(".").endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return _real(host, *args, **kwargs)
    socket.getaddrinfo = _getaddrinfo
    """
)

CLI = FAKE_DNS + "from coordlock.cli import script\nsys.argv[0] = 'coordlock'\nscript()\n"


@dataclass
class Env:
    """What a row may use: throwaway servers (started on first use) and a scratch folder."""

    tmp: Path
    get: Callable[[str], str]  # "redis" / "postgres" → host:port
    closed_port: int = field(default_factory=free_port)


@dataclass
class Row:
    input: str  # as shown in the table (Markdown)
    error: str
    status: str  # "78", "69", "64", or "–" for a Python exception
    timing: str
    argv: Callable[[Env], list[str]] | None = None  # coordlock's arguments
    env: Callable[[Env], dict[str, str]] = lambda e: {}
    code: Callable[[Env], str] | None = None  # a Python call instead of a command
    expect: str = ""  # a fragment of the message

    @property
    def id(self) -> str:
        return re.sub(r"[^\w.:/=-]+", "_", self.input)[:60]


def _pg(e: Env, path: str) -> str:
    return f"postgresql://{path.format(addr=e.get('postgres'))}"


ROWS = [
    Row("`coordlock run --url '' …`", "`ConfigurationError`: --url is empty", "78", AT_ONCE,
        argv=lambda e: ["run", "--name", "x", "--url", "", "--", "true"],
        expect="--url is empty"),
    Row("`COORDLOCK_URL='  ' coordlock run …`",
        "`ConfigurationError`: $COORDLOCK_URL is set but empty (no fallback to SQLite)", "78",
        AT_ONCE, argv=lambda e: ["run", "--name", "x", "--", "true"],
        env=lambda e: {"COORDLOCK_URL": "  "}, expect="set but empty"),
    Row("`--url nope://host`", "`ConfigurationError`: unknown URL scheme, lists the known ones",
        "78", AT_ONCE, argv=lambda e: ["locks", "--url", "nope://host"],
        expect="known schemes"),
    Row("`--url sqlite://locks.db` (two slashes)", "`ConfigurationError`: bad SQLite URL", "78",
        AT_ONCE, argv=lambda e: ["locks", "--url", "sqlite://locks.db"], expect="sqlite:///"),
    Row("`--url 'sqlite:///x.db?bogus=1'`", "`ConfigurationError`: unknown option, lists the "
        "known ones", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", f"sqlite:///{e.tmp}/x.db?bogus=1"], expect="bogus"),
    Row("`--url redis://127.0.0.1:PORT/0`, nothing listening", "`BackendUnavailable`", "69",
        AFTER_RETRIES,
        argv=lambda e: ["locks", "--url", f"redis://127.0.0.1:{e.closed_port}/0"],
        expect="backend unavailable"),
    Row("`--url redis://no-such-host.invalid:6379/0` (a DNS typo)",
        "`ConfigurationError`: host name not known", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", "redis://no-such-host.invalid:6379/0"]),
    Row("`--url redis://HOST:PORT/99`, db index out of range", "`ConfigurationError`", "78",
        AT_ONCE, argv=lambda e: ["locks", "--url", f"redis://{e.get('redis')}/99"],
        expect="99"),
    Row("`--url redis://HOST:PORT/abc`, db not a number", "`ConfigurationError`", "78",
        AT_ONCE, argv=lambda e: ["locks", "--url", f"redis://{e.get('redis')}/abc"],
        expect="abc"),
    Row("`--url postgresql://HOST:PORT/nosuchdb`", "`ConfigurationError`: database does not "
        "exist", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", _pg(e, "postgres@{addr}/nosuchdb")],
        expect="nosuchdb"),
    Row("`--url postgresql://nosuchuser@HOST:PORT/postgres`", "`ConfigurationError`: role does "
        "not exist", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", _pg(e, "nosuchuser@{addr}/postgres")],
        expect="nosuchuser"),
    Row("`--url 'postgresql://HOST:PORT/postgres?sslmode=bogus'`",
        "`ConfigurationError`: invalid sslmode", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", _pg(e, "postgres@{addr}/postgres?sslmode=bogus")],
        expect="sslmode"),
    Row("`--url postgresql://db.invalid/app` (a DNS typo)",
        "`ConfigurationError`: host name not known", "78", AT_ONCE,
        argv=lambda e: ["locks", "--url", "postgresql://app@db.invalid/app"]),
    Row("`coordlock run --ttl 1ms …`", "usage: --ttl too short (at least 1s)", "64", AT_ONCE,
        argv=lambda e: ["run", "--name", "x", "--ttl", "1ms", "--url", "memory://", "--",
                        "true"], expect="too short"),
    Row("`coordlock run --ttl soon …`", "usage: bad duration", "64", AT_ONCE,
        argv=lambda e: ["run", "--name", "x", "--ttl", "soon", "--", "true"],
        expect="bad duration"),
    Row("`coordlock run --name '' …`", "usage: --name must not be empty", "64", AT_ONCE,
        argv=lambda e: ["run", "--name", "", "--url", "memory://", "--", "true"],
        expect="must not be empty"),
    Row("`coordlock run --name x` (no command)", "usage: no command given", "64", AT_ONCE,
        argv=lambda e: ["run", "--name", "x", "--url", "memory://"], expect="no command"),
    Row("`coordlock --retry-deadline soon locks`", "usage: bad duration", "64", AT_ONCE,
        argv=lambda e: ["--retry-deadline", "soon", "locks"], expect="bad duration"),
    Row("`coordlock.connect('')`", "`ConfigurationError`: empty coordinator URL", "–", AT_ONCE,
        code=lambda e: "coordlock.connect('')", expect="ConfigurationError"),
    Row("`coordlock.configure('sqlite:///x.db', bogus=1)`",
        "`ConfigurationError` naming the valid options", "–", AT_ONCE,
        code=lambda e: f"coordlock.configure('sqlite:///{e.tmp}/x.db', bogus=1)",
        expect="ConfigurationError"),
    Row("`coordlock.lock('x', ttl=0)`", "`ValueError`: ttl must be > 0", "–", AT_ONCE,
        code=lambda e: "coordlock.lock('x', ttl=0)", expect="ValueError"),
    Row("`Scheduler().every(5, retry=3)`", "`ConfigurationError`: did you mean `retries`", "–",
        AT_ONCE, code=lambda e: "coordlock.Scheduler().every(5, retry=3)",
        expect="retries"),
]


def render(rows: list[Row]) -> str:
    """The table as it stands in the page, between the markers."""
    lines = [
        START,
        "| Input | Error | Exit status | Time to fail |",
        "|---|---|---|---|",
        *(f"| {r.input} | {r.error} | {r.status} | {r.timing} |" for r in rows),
        END,
    ]
    return "\n".join(lines)


def test_the_table_in_the_docs_is_these_rows() -> None:
    text = PAGE.read_text()
    expected = render(ROWS)
    if os.environ.get("COORDLOCK_WRITE_DOCS") == "1":
        found = re.search(re.escape(START) + ".*?" + re.escape(END), text, re.S)
        assert found, f"put the markers in {PAGE} first"
        PAGE.write_text(text[: found.start()] + expected + text[found.end():])
        text = PAGE.read_text()
    assert expected in text, (
        f"docs/failure-model.md's bad-input table differs from the rows of this test; "
        f"rerun with COORDLOCK_WRITE_DOCS=1, or paste:\n{expected}"
    )


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str], str]]:
    started: dict[str, RedisServer | PostgresServer] = {}

    def get(kind: str) -> str:
        if kind not in started:
            factory = {"redis": RedisServer, "postgres": lambda: PostgresServer(fast=True)}[kind]
            try:
                started[kind] = factory().start()  # type: ignore[operator]
            except ServerUnavailable as exc:
                if os.environ.get("CI", "").lower() in ("true", "1"):
                    pytest.fail(f"{kind} for the bad-input table: {exc}")
                pytest.skip(f"{kind} for the bad-input table: {exc}")
        server = started[kind]
        return f"{server.host}:{server.port}"

    try:
        yield get
    finally:
        for server in started.values():
            server.close()


def _params() -> list[object]:
    return [pytest.param(row, id=row.id) for row in ROWS]


@pytest.mark.parametrize("row", _params())
def test_bad_input(row: Row, tmp_path: Path, servers: Callable[[str], str]) -> None:
    env = Env(tmp_path, servers)
    deadline = AT_ONCE_DEADLINE if row.timing == AT_ONCE else 1.0
    if row.code is not None:
        script = FAKE_DNS + textwrap.dedent(
            f"""
            import coordlock
            try:
                {row.code(env)}
            except Exception as exc:
                print(f"{{type(exc).__name__}}: {{exc}}")
                raise SystemExit(0)
            raise SystemExit("no error")
            """
        )
        argv = [sys.executable, "-c", script]
    else:
        assert row.argv is not None
        argv = [sys.executable, "-c", CLI, *row.argv(env)]
        if not any(a.startswith("--retry-deadline") for a in argv):
            argv[3:3] = ["--retry-deadline", f"{deadline}s"]
    started = time.monotonic()
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=cli_env(row.env(env)), stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    if row.code is not None:
        assert out.returncode == 0, text
        error = row.error.split("`")[1] if "`" in row.error else row.error
        assert out.stdout.startswith(f"{error}:"), text
    else:
        assert str(out.returncode) == row.status, text
    assert row.expect in text, text
    if row.timing == AT_ONCE:
        assert "retrying" not in text, text  # a permanent error is not retried
        assert took < AT_ONCE_DEADLINE, f"took {took:.1f} s: it waited for the retry deadline"
    else:
        assert took >= deadline  # it did retry until the deadline
