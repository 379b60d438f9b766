"""``zookeeper://`` URLs and options: parsing, validation, ACLs and TLS settings.

Everything here fails fast with :class:`~coordlock.ConfigurationError` (bad host list, bad
chroot, unknown or malformed option, unreadable certificate files), before any connection is
attempted.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._errors import ConfigurationError
from ..._registry import redact
from ..._validate import parse_duration

try:
    from kazoo.hosts import collect_hosts
    from kazoo.security import ACL, Id, Permissions, make_digest_acl
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    from ..._registry import missing_driver

    raise missing_driver("zookeeper", "kazoo", "zookeeper") from exc

#: Options with a duration value (seconds, or "5s", "2m"...).
DURATION_OPTIONS = frozenset({"session_timeout", "sweep_interval", "retry_deadline"})
#: kazoo's own TLS options, passed through under the same names.
TLS_FILE_OPTIONS = ("ca", "certfile", "keyfile")
BOOL_OPTIONS = frozenset({"use_ssl", "verify_certs", "check_hostname"})
OPTIONS = frozenset(
    {
        "session_timeout",
        "sweep_interval",
        "history_limit",
        "retry_deadline",
        "read_acl",
        "keyfile_password",
        *TLS_FILE_OPTIONS,
        *BOOL_OPTIONS,
    }
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class TLS:
    """kazoo's TLS options (``use_ssl`` implied). Paths are PEM files; seconds nowhere."""

    ca: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    keyfile_password: str | None = field(default=None, repr=False)
    verify_certs: bool = True
    check_hostname: bool = False

    def kazoo_options(self) -> dict[str, Any]:
        """Keyword arguments for ``KazooClient`` (and ``kazoo.handlers.utils``)."""
        return {
            "use_ssl": True,
            "ca": self.ca,
            "certfile": self.certfile,
            "keyfile": self.keyfile,
            "keyfile_password": self.keyfile_password,
            "verify_certs": self.verify_certs,
            "check_hostname": self.check_hostname,
        }

    def context(self) -> ssl.SSLContext:
        """The client context kazoo will build (same settings): used to check the files up
        front and to diagnose a refused handshake. Raises ConfigurationError."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False  # before verify_mode may become CERT_NONE
        context.verify_mode = ssl.CERT_REQUIRED if self.verify_certs else ssl.CERT_NONE
        context.check_hostname = self.check_hostname
        try:
            if self.ca:
                context.load_verify_locations(self.ca)
            if self.certfile and self.keyfile:
                context.load_cert_chain(self.certfile, self.keyfile, self.keyfile_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"zookeeper:// TLS files: {exc}") from exc
        return context


def parse_bool(key: str, value: object) -> bool:
    """``true``/``false``/``1``/``0``/``yes``/``no``/``on``/``off`` (or a bool)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{key} must be true or false, not {value!r}")


def check_chroot(path: str) -> str:
    """A chroot ZooKeeper accepts (``/a/b``; no empty, ``.``/``..`` or reserved parts)."""
    chroot = path.rstrip("/")
    if not chroot:
        return ""
    if not chroot.startswith("/"):
        raise ConfigurationError(f"bad ZooKeeper chroot {path!r}: must start with /")
    parts = chroot.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigurationError(f"bad ZooKeeper chroot {path!r}: empty, . or .. part")
    if parts[0] == "zookeeper":
        raise ConfigurationError(f"bad ZooKeeper chroot {path!r}: /zookeeper is reserved")
    for char in chroot:
        code = ord(char)
        if (
            code < 0x20
            or 0x7F <= code <= 0x9F
            or 0xD800 <= code <= 0xF8FF
            or 0xFFF0 <= code <= 0xFFFF
        ):
            raise ConfigurationError(
                f"bad ZooKeeper chroot {path!r}: character U+{code:04X} is not allowed"
            )
    return chroot


def parse_read_acl(value: str | list[str] | tuple[str, ...]) -> tuple[ACL, ...]:
    """``scheme:id`` entries (comma-separated) granted READ only, e.g.
    ``digest:monitor:<base64 sha1>`` or ``ip:10.0.0.5`` or ``world:anyone``."""
    entries = value.split(",") if isinstance(value, str) else list(value)
    acls = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        scheme, _, ident = entry.partition(":")
        if not scheme or not ident:
            raise ConfigurationError(
                f"bad read_acl entry {entry!r}: expected scheme:id, e.g. digest:monitor:<hash>"
            )
        acls.append(ACL(Permissions.READ, Id(scheme, ident)))
    if not acls:
        raise ConfigurationError("read_acl is empty")
    return tuple(acls)


def node_acl(auth: tuple[str, str] | None, read_acl: tuple[ACL, ...]) -> list[ACL] | None:
    """The ACL of every node coordlock creates: all permissions to the authenticated digest
    identity only, plus READ for ``read_acl``; None (ZooKeeper's world ACL) without
    credentials."""
    if auth is None:
        if read_acl:
            raise ConfigurationError("read_acl needs credentials (zookeeper://user:pass@...)")
        return None
    return [make_digest_acl(auth[0], auth[1], all=True), *read_acl]


def parse_url(url: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``zookeeper://[user:password@]h1:2181,h2:2181[/chroot][?opt=value...]`` →
    (kazoo hosts, chroot, keyword options). Keyword ``options`` win over the query string."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"malformed URL {redact(url)!r}: {exc}") from exc
    if parts.scheme.lower() != "zookeeper":
        raise ConfigurationError(f"not a zookeeper:// URL: {redact(url)!r}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ConfigurationError(f"no ZooKeeper host in {redact(url)!r}")
    try:
        collect_hosts(hosts)
    except ValueError as exc:
        raise ConfigurationError(f"bad ZooKeeper hosts {hosts!r}: {exc}") from exc
    chroot = check_chroot(unquote(parts.path))
    merged: dict[str, Any] = {}
    if at:
        user, colon, password = userinfo.partition(":")
        if not user or not colon:
            raise ConfigurationError(
                f"ZooKeeper credentials must be user:password@ in {redact(url)!r}"
            )
        merged["auth"] = (unquote(user), unquote(password))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        merged[key] = value
    merged.update(options)
    unknown = sorted(set(merged) - OPTIONS - {"auth"})
    if unknown:
        raise ConfigurationError(
            f"unknown zookeeper:// option(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(OPTIONS))}"
        )
    return hosts, chroot, _convert(merged)


def _convert(merged: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if key in DURATION_OPTIONS and isinstance(value, str):
            out[key] = 0.0 if value.strip() in ("0", "0s") else _duration(key, value)
        elif key == "history_limit" and isinstance(value, str):
            try:
                out[key] = int(value)
            except ValueError as exc:
                raise ConfigurationError(f"history_limit must be an int: {value!r}") from exc
        elif key in BOOL_OPTIONS:
            out[key] = parse_bool(key, value)
        elif key == "read_acl":
            out[key] = parse_read_acl(value)
        else:
            out[key] = value
    return out


def make_tls(
    use_ssl: bool,
    ca: str | None,
    certfile: str | None,
    keyfile: str | None,
    keyfile_password: str | None,
    verify_certs: bool,
    check_hostname: bool = False,
) -> TLS | None:
    """The TLS settings, checked (files readable, key matches); None without ``use_ssl``."""
    given = [name for name, v in zip(TLS_FILE_OPTIONS, (ca, certfile, keyfile), strict=True) if v]
    if not use_ssl:
        if given or keyfile_password or check_hostname:
            raise ConfigurationError(
                f"{', '.join(given) or 'keyfile_password'} given without use_ssl=true "
                "(the connection would not use TLS)"
            )
        return None
    if check_hostname and not verify_certs:
        raise ConfigurationError("check_hostname=true needs verify_certs=true")
    if bool(certfile) != bool(keyfile):
        raise ConfigurationError("certfile and keyfile go together (the client certificate)")
    tls = TLS(
        ca or None,
        certfile or None,
        keyfile or None,
        keyfile_password,
        verify_certs,
        check_hostname,
    )
    tls.context()  # raises ConfigurationError for unreadable files
    return tls


def _duration(key: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigurationError(f"bad {key} {value!r}: {exc}") from exc
