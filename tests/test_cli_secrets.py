"""Secrets never reach the terminal or the log: every command, every outcome, at ``-vv``.

The URL forms carry test secrets in the userinfo password and in secret-bearing query
parameters; each command of the command line runs with each URL (given as ``--url`` and as
``$COORDLOCK_URL``), on success and failure paths, and all of stdout and stderr is searched.
"""

from __future__ import annotations

import pytest
from cli_helpers import run_cli

from coordlock._redact import redact_url, scrub, secrets_in
from coordlock._registry import redact
from coordlock.testing.servers import free_port

USERINFO = "Us3rinfoSecret"
QUERY = "Qu3rySecret"
TOKEN = "T0kenSecret"
SSL = "Ss1Secret"
SECRETS = (USERINFO, QUERY, TOKEN, SSL)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw0rd@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://app:pw0rd@h/0?prefix=x:", "redis://app:***@h/0?prefix=x:"),
        (
            "postgresql://u@h:1/db?password=s3cret&sslmode=require",
            "postgresql://u@h:1/db?password=***&sslmode=require",
        ),
        (
            "postgresql://u:a@h/db?SSLPassword=x&Token=y&api_key=z&secret=w&auth=v",
            "postgresql://u:***@h/db?SSLPassword=***&Token=***&api_key=***&secret=***&auth=***",
        ),
        (
            "redis+sentinel://:m@s1:26379,s2/mymaster?sentinel_password=sp&ssl_password=kp",
            "redis+sentinel://:***@s1:26379,s2/mymaster?sentinel_password=***&ssl_password=***",
        ),
        ("zookeeper://user:p%40ss@zk1:2181,zk2/app", "zookeeper://user:***@zk1:2181,zk2/app"),
        ("redis://user@h/0", "redis://user@h/0"),  # a user name is not a secret
        ("sqlite:///locks.db?timeout=5", "sqlite:///locks.db?timeout=5"),
        ("postgresql://h/db?passfile=/etc/pgpass", "postgresql://h/db?passfile=/etc/pgpass"),
        ("host=db password='a b' user=x", "host=db password=*** user=x"),
        ("redis://h:[bad", "<unparsable url>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact(url) == shown  # the registry's name for it is the same function


def test_scrub_masks_secret_values_anywhere() -> None:
    url = "postgresql://u:p%40ss@h/db?password=Qu3ry&token=T0k"
    assert set(secrets_in(url)) >= {"p%40ss", "p@ss", "Qu3ry", "T0k"}
    text = "auth failed: password 'p@ss' / Qu3ry / T0k for u"
    assert scrub(text, url) == "auth failed: password '***' / *** / *** for u"
    assert scrub("nothing here", None, "") == "nothing here"


def _urls(tmp: str, port: int) -> list[str]:
    return [
        f"memory://app:{USERINFO}@secrets?token={TOKEN}",  # works: the success paths
        f"sqlite:///{tmp}/s.db?password={QUERY}&token={TOKEN}",  # unknown option: an error
        f"redis://app:{USERINFO}@127.0.0.1:{port}/0?password={QUERY}",  # unreachable
        f"rediss://:{USERINFO}@127.0.0.1:{port}/0?ssl_password={SSL}&token={TOKEN}",
        f"redis+sentinel://:{USERINFO}@127.0.0.1:{port}/mymaster?sentinel_password={QUERY}",
        f"postgresql://app:{USERINFO}@127.0.0.1:{port}/db?password={QUERY}&sslpassword={SSL}",
        f"zookeeper://app:{USERINFO}@127.0.0.1:{port}/app?token={TOKEN}",
        f"nope://app:{USERINFO}@host/?password={QUERY}",  # unknown scheme
        f"redis://app:{USERINFO}@[::1/0?password={QUERY}",  # malformed
    ]


COMMANDS = [
    ["run", "--name", "s", "--", "true"],
    ["locks"],
    ["locks", "--json"],
    ["unlock", "s", "--force", "--yes"],
    ["history", "--json"],
    ["jobs"],
    ["check"],
    ["check", "--json"],
    ["demo", "--seconds", "4"],
]


@pytest.mark.parametrize(
    ("index", "via"),
    [(i, "--url") for i in range(9)] + [(i, "env") for i in (0, 2, 5)],  # env: the same code
)
def test_no_command_prints_a_secret(
    index: int, via: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = _urls(str(tmp_path_factory.mktemp("secrets")), free_port())[index]
    scheme = url.split("://", 1)[0]
    seen = []
    for command in COMMANDS:
        if command[0] == "demo" and scheme in ("memory", "redis", "rediss", "redis+sentinel",
                                               "postgresql", "zookeeper"):
            continue  # the demo refuses memory:// and would wait on an unreachable server
        args = ["-vv", "--retry-deadline", "0.2s", *command]
        if via == "--url":
            out = run_cli(*args, "--url", url, timeout=120)
        else:
            out = run_cli(*args, env={"COORDLOCK_URL": url}, timeout=120)
        text = out.stdout + out.stderr
        seen.append((command, out.returncode))
        for secret in SECRETS:
            assert secret not in text, (command, url, text)
        assert "Traceback" not in text, (command, text)
    assert seen, "no command ran"
    if scheme == "memory":  # the success paths did run
        # (unlock exits 69 while the backend has no force_release)
        assert all(s == 0 or (c[0] == "unlock" and s == 69) for c, s in seen), seen
