"""docs/security.md repeats the Redis ACL line and the PostgreSQL grants of the backend pages:
they must stay the same (the backend tests run the contract under exactly those)."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _acl_line(text: str) -> str:
    match = re.search(r"^ACL SETUSER coordlock .*$", text, re.M)
    assert match, "no ACL SETUSER line"
    return match.group(0)


def _grants(text: str) -> list[str]:
    return re.findall(r"^GRANT .*;$", text, re.M)


def test_the_redis_acl_line_is_the_backend_pages() -> None:
    security = (DOCS / "security.md").read_text()
    redis = (DOCS / "backends" / "redis.md").read_text()
    assert _acl_line(security) == _acl_line(redis)


def test_the_postgres_grants_are_the_backend_pages() -> None:
    security = (DOCS / "security.md").read_text()
    postgres = (DOCS / "backends" / "postgres.md").read_text()
    assert _grants(security) and _grants(security) == _grants(postgres)
