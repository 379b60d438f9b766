"""Masking secrets in URLs and text before they are printed or logged.

One function, :func:`redact_url`, is used everywhere a coordinator URL reaches a message, a
log line or the terminal (``coordlock._registry.redact`` is the same function). It masks:

* the password of the userinfo (``user:s3cret@host`` → ``user:***@host``);
* the value of every query parameter whose name (case-insensitive) is in
  :data:`SECRET_PARAMETERS` (``?password=s3cret`` → ``?password=***``);
* in a libpq-style ``key=value`` string (no ``scheme://``), the same keys' values.

:func:`scrub` removes a URL's secret values from any other text (a driver's error message that
echoes a password, say): the last line of defence of the command line.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

#: Query parameters (and libpq keywords) whose values are secrets; compared in lower case.
SECRET_PARAMETERS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "sslpassword",
        "ssl_password",
        "sentinel_password",
        "token",
        "access_token",
        "auth_token",
        "auth",
        "api_key",
        "apikey",
        "secret",
        "client_secret",
    }
)

_KEY_VALUE = re.compile(
    r"(?i)\b(" + "|".join(sorted(SECRET_PARAMETERS, key=len, reverse=True)) + r")"
    r"(\s*=\s*)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;]+)"
)


def _is_secret(name: str) -> bool:
    return unquote(name).strip().lower() in SECRET_PARAMETERS


def _redact_query(query: str) -> str:
    parts = []
    for piece in query.split("&"):
        name, eq, _value = piece.partition("=")
        parts.append(f"{name}={MASK}" if eq and _is_secret(name) else piece)
    return "&".join(parts)


def _redact_netloc(netloc: str) -> str:
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _password = userinfo.partition(":")
    return f"{user}:{MASK}@{hosts}" if colon else netloc


def redact_url(url: str) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``.

    Safe to print and to log. A string without ``scheme://`` is treated as libpq-style
    ``key=value`` text. Never raises: an unparsable URL comes back as ``<unparsable url>``.
    """
    if not isinstance(url, str):
        return "<not a str>"
    if "://" not in url:
        return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = _redact_netloc(parts.netloc)
    query = _redact_query(parts.query) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def secrets_in(url: str) -> list[str]:
    """The secret values of ``url`` (as written and percent-decoded), longest first."""
    if not isinstance(url, str) or "://" not in url:
        found = [m.group(3).strip("'\"") for m in _KEY_VALUE.finditer(url or "")]
    else:
        try:
            parts = urlsplit(url)
        except ValueError:
            return []
        found = []
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        for piece in parts.query.split("&"):
            name, eq, value = piece.partition("=")
            if eq and _is_secret(name):
                found.append(value)
    values = {v for raw in found for v in (raw, unquote(raw), unquote(raw.replace("+", " ")))}
    return sorted((v for v in values if len(v) >= 3), key=len, reverse=True)


def scrub(text: str, *urls: str | None) -> str:
    """``text`` with every secret value of ``urls`` replaced by ``***``.

    For messages that may echo a secret without the URL around it (a driver's error). Values
    shorter than 3 characters are left alone (masking them would garble the text).
    """
    for url in urls:
        if not url:
            continue
        for secret in secrets_in(url):
            text = text.replace(secret, MASK)
    return text


__all__ = ["MASK", "SECRET_PARAMETERS", "redact_url", "scrub", "secrets_in"]
