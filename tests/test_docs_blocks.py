"""Every Python code block of README.md and docs/ runs, as a reader following the page would.

How a page is run:

* its ```` ```python ```` blocks run in order in one fresh interpreter (so a later block may use
  what an earlier one defined), in an empty temporary folder, with
  ``COORDLOCK_URL=sqlite:///…/docs.db`` (the pages assume a configured coordinator);
* a block whose first line starts with ``>>>`` is a doctest: its printed results are checked;
* example server hosts are real throwaway servers: ``redis.internal`` is a Redis started for
  this test (see :data:`SERVERS`), so ``configure("redis://redis.internal:6379/0")`` really
  talks to Redis;
* ``coordlock`` is imported (fragments assume it); names that stand for the reader's own
  code (``write_report``, ``import_orders``, …) are stubs that accept anything
  (:data:`PLACEHOLDERS`); ``coordinator`` starts as a coordinator of
  ``$COORDLOCK_URL``; ``Scheduler.run_forever()`` gets a SIGTERM after a moment, which it
  handles by stopping cleanly;
* a block right after an HTML comment ``<!-- skip: REASON -->`` is not run. Skips must give a
  reason and stay few (:data:`MAX_SKIPS`).

A failing block's traceback points at the page and line (``docs/locks.md``, line N).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordlock.testing.servers import RedisServer, ServerUnavailable

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MAX_SKIPS = 8  # framework sketches (FastAPI, aiohttp, Django, APScheduler, queues)

#: Names the pages use for the reader's own code; each becomes a do-anything stub.
PLACEHOLDERS = [
    "abort_job", "batch", "batches", "db", "import_orders", "index", "metrics",
    "page_someone", "pause_writes", "rewrite", "run_reindex", "settings", "store",
    "write_report",
]

#: Example hosts in the pages → the throwaway server that plays them.
SERVERS = {"redis.internal": "redis"}

SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[\w+-]*)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    info: str
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` with their skip markers."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, info = opening.group("indent"), opening.group("info")
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [line[len(indent):] for line in lines[i + 1 : j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = SKIP.search(lines[k]) if k >= 0 else None
        found.append(
            Block(page, i + 2, info, "\n".join(body) + "\n", marker.group("reason") if marker
                  else None)
        )
        i = j + 1
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks_of(page) if b.info in ("python", "py", "pycon")]


RUNNER = textwrap.dedent(
    '''
    import doctest, json, os, signal, sys, threading

    import coordlock

    blocks, placeholders = json.load(open(sys.argv[1]))


    class Stub:
        """Stands for the reader's own code: callable, iterable, subscriptable, a context."""

        def __init__(self, name):
            self._name = name

        def __call__(self, *args, **kwargs):
            return Stub(self._name + "()")

        def __getattr__(self, name):
            return Stub(f"{self._name}.{name}")

        def __getitem__(self, key):
            return Stub(f"{self._name}[{key!r}]")

        def __iter__(self):
            return iter(())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __repr__(self):
            return f"<stub {self._name}>"


    real_run_forever = coordlock.Scheduler.run_forever


    def bounded_run_forever(self):
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        real_run_forever(self)


    coordlock.Scheduler.run_forever = bounded_run_forever
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    namespace.update({name: Stub(name) for name in placeholders})
    namespace["coordlock"] = coordlock  # fragments on a page assume `import coordlock`
    namespace["coordinator"] = coordlock.connect(os.environ["COORDLOCK_URL"])
    for block in blocks:
        print(f"--- {block['where']}", flush=True)
        if block["doctest"]:
            test = doctest.DocTestParser().get_doctest(
                block["code"], namespace, block["where"], block["page"], block["line"] - 1
            )
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
            runner.run(test, clear_globs=False)
            if runner.failures:
                sys.exit(f"doctest failed at {block['where']}")
        else:
            padded = "\\n" * (block["line"] - 1) + block["code"]
            exec(compile(padded, block["page"], "exec"), namespace)
    print("--- all blocks ran", flush=True)
    '''
)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """host:port of each example server, started on first use."""
    started: dict[str, RedisServer] = {}

    class Lazy(dict[str, str]):
        def __missing__(self, kind: str) -> str:
            assert kind == "redis", kind
            try:
                server = RedisServer().start()
            except ServerUnavailable as exc:
                if os.environ.get("CI", "").lower() in ("true", "1"):
                    pytest.fail(f"Redis for the docs blocks: {exc}")
                pytest.skip(f"Redis for the docs blocks: {exc}")
            started[kind] = server
            self[kind] = f"{server.host}:{server.port}"
            return self[kind]

    try:
        yield Lazy()
    finally:
        for server in started.values():
            server.close()


def _with_servers(code: str, servers: dict[str, str]) -> str:
    for host, kind in SERVERS.items():
        if host in code:
            address = servers[kind]
            code = re.sub(rf"{re.escape(host)}(:\d+)?", address, code)
    return code


PAGES_WITH_PYTHON = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize(
    "page", PAGES_WITH_PYTHON, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_PYTHON]
)
def test_python_blocks_run(page: Path, tmp_path: Path, servers: dict[str, str]) -> None:
    blocks = [b for b in python_blocks(page) if b.skip is None]
    if not blocks:
        pytest.skip("every Python block of this page is marked skip (with a reason)")
    payload = [
        {
            "where": b.where,
            "page": str(b.page),
            "line": b.line,
            "code": _with_servers(b.code, servers),
            "doctest": b.code.lstrip().startswith(">>>"),
        }
        for b in blocks
    ]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([payload, PLACEHOLDERS]))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(RUNNER)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COORDLOCK_URL"}
    env["COORDLOCK_URL"] = f"sqlite:///{work}/docs.db"
    out = subprocess.run(
        [sys.executable, str(runner), str(spec)],
        cwd=work, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "--- all blocks ran" in out.stdout


def test_every_page_is_seen_and_skips_are_few_and_explained() -> None:
    assert ROOT / "README.md" in PAGES and len(PAGES) >= 10
    skips = [b for p in PAGES for b in python_blocks(p) if b.skip is not None]
    for block in skips:
        assert len(block.skip or "") >= 10, f"{block.where}: say why the block is skipped"
    assert len(skips) <= MAX_SKIPS, [b.where for b in skips]
    total = sum(len(python_blocks(p)) for p in PAGES)
    assert total - len(skips) >= 20  # the pages' Python really runs


def test_block_parser_honours_skip_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- skip: needs a Redis server -->\n\n"
        "```python\nboom()\n```\n\n```text\nnot python\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (4, "x = 1\n", None),
        (10, "boom()\n", "needs a Redis server"),
    ]


def test_no_internal_pages_are_published() -> None:
    assert not (ROOT / "docs" / "internals-brief.md").exists()
    assert "internals-brief" not in (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        machine_path = re.search(r"(?<![\w.~])/(work|home|root|Users)/\w", page.read_text())
        assert machine_path is None, f"{page}: a path of someone's machine"


def test_redis_defaults_in_the_url_reference_match_the_code() -> None:
    from coordlock.backends import redis as redis_backend

    text = (ROOT / "docs" / "urls.md").read_text()
    shown = re.search(r"`socket_timeout` \(default (\d+(?:\.\d+)?)\)", text)
    assert shown is not None
    assert float(shown.group(1)) == redis_backend.DEFAULT_SOCKET_TIMEOUT
    connect = re.search(r"`socket_connect_timeout` \(default (\d+(?:\.\d+)?)\)", text)
    assert connect is not None
    assert float(connect.group(1)) == redis_backend.DEFAULT_CONNECT_TIMEOUT


def test_readme_script_does_not_end_with_a_bare_start() -> None:
    (block,) = [b for b in python_blocks(ROOT / "README.md")]
    last = [line for line in block.code.splitlines() if line.strip()][-1]
    assert not last.strip().startswith("sched.start()")
    readme = (ROOT / "README.md").read_text()
    assert "mkdocs serve" in readme and ".[dev]" in readme
