"""The status page as server-rendered HTML (no template engine, no build step).

:func:`page` renders the whole document; :func:`live` only the part the page's script fetches
again every few seconds (``?partial=1``). Every value from the coordinator is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from ._data import PROBLEMS, STATUSES

_DASH = "–"


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _secs(value: float | None) -> str:
    if value is None:
        return _DASH
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return _DASH
    delta = now - ts
    return f"in {_secs(-delta)}" if delta < 0 else f"{_secs(delta)} ago"


def _when(ts: float | None, iso: str | None, now: float) -> str:
    if ts is None:
        return _DASH
    return f'<time datetime="{_e(iso)}" title="{_e(iso)}">{_e(_ago(ts, now))}</time>'


def _badge(status: str | None) -> str:
    if not status:
        return _DASH
    kind = status.split(":", 1)[0]
    return f'<span class="badge s-{_e(kind)}">{_e(status)}</span>'


Row = tuple[str, list[tuple[str, str]]]  # (attributes of <tr>, [(td class, cell html)])


def _table(cls: str, headers: list[str], rows: list[Row], empty: str) -> str:
    """A table; each cell carries its column's name (``data-label``), which the narrow-screen
    layout shows in front of the value (rows become cards on a phone)."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    body = []
    for attrs, cells in rows:
        tds = "".join(
            f'<td class="{c}" data-label="{_e(h)}">'
            + (f'<span class="v">{html}</span>' if html else "")
            + "</td>"
            for h, (c, html) in zip(headers, cells, strict=True)
        )
        body.append(f"<tr {attrs}>{tds}</tr>")
    return (
        f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table></div>'
    )


def _summary(data: dict[str, Any]) -> str:
    s = data["summary"]
    chips = [
        ("instances alive", s["instances_alive"], ""),
        ("jobs", s["jobs"], ""),
        ("running", s["running"], ""),
        ("failed", s["failed"], "bad" if s["failed"] else ""),
        ("stuck", s["stuck"], "bad" if s["stuck"] else ""),
        ("missed", s["missed"], "bad" if s["missed"] else ""),
        ("locks held", s["locks"], ""),
    ]
    items = "".join(
        f'<li class="chip {cls}" data-summary="{_e(label)}"><b>{_e(n)}</b> {_e(label)}</li>'
        for label, n, cls in chips
    )
    return f'<ul class="summary" aria-label="summary">{items}</ul>'


def _instances(data: dict[str, Any], now: float) -> str:
    rows: list[Row] = []
    for i in data["instances"]:
        state = {True: "alive", False: "gone", None: "unknown"}[i["alive"]]
        lease = (
            f"expires in {_secs(i['expires_in'])}" if i["expires_in"] is not None else _DASH
        )
        last = _when(i["last_run"], i["last_run_iso"], now)
        if i["last_job"]:
            last += f" · {_e(i['last_job'])}"
        rows.append((
            f'class="{"" if i["alive"] is not False else "dim"}" '
            f'data-instance="{_e(i["instance"])}"',
            [
                ("name", _e(i["instance"])),
                ("", f'<span class="badge i-{state}">{state}</span>'),
                ("", _e(i["holder"] or _DASH)),
                ("nowrap", _e(lease)),
                ("", last),
                ("num", _e(i["runs"])),
            ],
        ))  # fmt: skip
    return _table(
        "instances",
        ["instance", "state", "host:pid", "liveness lease", "last run", "runs"],
        rows,
        "No scheduler instance seen (none alive, none in recent history).",
    )


def _jobs(data: dict[str, Any], now: float) -> str:
    rows: list[Row] = []
    for j in data["jobs"]:
        last = j["last_run"]
        took = _secs(last["duration"]) if last and last["duration"] is not None else _DASH
        running = ' <span class="badge s-running">running</span>' if j["running"] else ""
        counts = " · ".join(
            f'<span class="{"bad" if j[k] and k in PROBLEMS else ""}">{j[k]} {word}</span>'
            for k, word in (("finished", "ok"), ("failed", "failed"), ("stuck", "stuck"),
                            ("missed", "missed"), ("skipped", "skipped"))
        )  # fmt: skip
        rows.append((
            f'class="{"problem" if j["problem"] else ""}" data-job="{_e(j["job"])}"',
            [
                ("name", _e(j["job"]) + running),
                ("", _e(j["schedule"] or _DASH)),
                ("nowrap", _when(j["next_run"], j["next_run_iso"], now)),
                ("", _badge(j["last_status"])),
                ("nowrap", _when(last["started"], last["started_iso"], now) if last else _DASH),
                ("nowrap", _e(took)),
                ("", _e(last["instance"]) if last else _DASH),
                ("counts", counts),
                ("error", _e(last["error"]) if last and last["error"] else ""),
            ],
        ))  # fmt: skip
    return _table(
        "jobs",
        ["job", "schedule", "next run", "last status", "last run", "took", "instance",
         "recent runs", "last error"],
        rows,
        "No job has run yet (jobs appear here after their first run).",
    )  # fmt: skip


def _runs(data: dict[str, Any], now: float) -> str:
    rows: list[Row] = []
    for r in data["runs"]:
        note = _e(r["error"] or "")
        if r["warning"]:
            note = f'{note} <span class="warn">⚠ {_e(r["warning"])}</span>'.strip()
        rows.append((
            f'class="{"problem" if r["problem"] else ""}" data-status="{_e(r["status"])}" '
            f'data-job="{_e(r["job"])}"',
            [
                ("name", _e(r["job"])),
                ("tick", _e(r["tick"])),
                ("", _badge(r["status"])),
                ("nowrap", _when(r["started"], r["started_iso"], now)),
                ("nowrap", _e(_secs(r["duration"]))),
                ("", _e(r["instance"])),
                ("error", note),
            ],
        ))  # fmt: skip
    f = data["filters"]
    which = " ".join(x for x in (f["status"] or "", "runs", f"of {f['job']}" if f["job"] else ""))
    return _table(
        "runs",
        ["job", "tick (UTC)", "status", "started", "took", "instance", "error"],
        rows,
        f"No {which.strip()} recorded.",
    )


def _locks(data: dict[str, Any], unlock: bool) -> str:
    if not data["capabilities"]["locks"]:
        return '<p class="empty">This backend cannot list its locks.</p>'
    rows: list[Row] = []
    for lock in data["locks"]:
        kind = {"instance": "liveness lease", "job": "job run lease"}.get(lock["kind"], "lock")
        holder = lock["holder"] or lock["owner"]
        button = ""
        if unlock:
            button = (
                f'<button type="button" class="unlock" data-lock="{_e(lock["name"])}" '
                f'data-holder="{_e(holder)}" data-fence="{_e(lock["fence"])}">'
                "Force unlock</button>"
            )
        left = lock["expires_in"]
        cells = [
            ("name", _e(lock["name"])),
            ("", _e(kind)),
            ("", _e(holder)),
            ("num", _e(lock["fence"])),
            ("nowrap", _e(_secs(left) if left is not None else _DASH)),
        ]
        if unlock:
            cells.append(("", button))
        rows.append((f'data-lock="{_e(lock["name"])}" class="k-{_e(lock["kind"])}"', cells))
    headers = ["name", "kind", "holder (host:pid)", "fence", "expires in"]
    return _table(
        "locks", [*headers, "action"] if unlock else headers, rows, "No lock is held."
    )


def live(data: dict[str, Any], *, unlock: bool, error: str | None = None) -> str:
    """The refreshable part of the page: summary and the four sections."""
    if error is not None:
        return (
            f'<div class="banner bad" role="alert">The coordinator could not be read: '
            f"{_e(error)}</div>"
        )
    now = data["generated_at"]
    notes = ""
    if not data["capabilities"]["history"]:
        notes = '<div class="banner">This backend keeps no run history.</div>'
    return (
        f'{notes}{_summary(data)}'
        f'<section id="instances"><h2>Instances</h2>{_instances(data, now)}</section>'
        f'<section id="jobs"><h2>Jobs</h2>{_jobs(data, now)}</section>'
        f'<section id="runs"><h2>Recent runs</h2>{_runs(data, now)}</section>'
        f'<section id="locks"><h2>Held locks</h2>{_locks(data, unlock)}</section>'
        f'<p class="stamp">Read <time datetime="{_e(data["generated_iso"])}">'
        f'{_e(data["generated_iso"])}</time> from {_e(data["backend"])}.</p>'
    )


def _filters(data: dict[str, Any] | None, job: str | None, status: str | None) -> str:
    names = data["job_names"] if data else []
    if job and job not in names:
        names = [job, *names]
    job_opts = ['<option value="">all jobs</option>'] + [
        f'<option value="{_e(n)}"{" selected" if n == job else ""}>{_e(n)}</option>'
        for n in names
    ]
    status_opts = ['<option value="">any status</option>'] + [
        f'<option value="{s}"{" selected" if s == status else ""}>{s}</option>'
        for s in STATUSES
    ]
    return (
        '<form class="filters" method="get" action="">'
        f'<label>Job <select name="job">{"".join(job_opts)}</select></label>'
        f'<label>Status <select name="status">{"".join(status_opts)}</select></label>'
        '<button type="submit">Filter</button></form>'
    )


def page(
    data: dict[str, Any] | None,
    *,
    title: str,
    label: str,
    static: str,
    api: str,
    refresh: float,
    unlock: bool,
    job: str | None = None,
    status: str | None = None,
    error: str | None = None,
) -> str:
    """The whole document. ``static``/``api``: URL prefixes of the static files and the API."""
    token = ""
    if unlock:
        token = (
            '<label class="token">Unlock token <input type="password" id="token" '
            'autocomplete="off" placeholder="from COORDLOCK_DASHBOARD_TOKEN"></label>'
        )
    body = live(data or {}, unlock=unlock, error=error) if error or data else ""
    mode = "force-unlock enabled" if unlock else "read-only"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="stylesheet" href="{_e(static)}/page.css">
<script defer src="{_e(static)}/page.js"></script>
</head>
<body data-refresh="{refresh:g}" data-api="{_e(api)}">
<header>
<h1>{_e(title)}</h1>
<p class="where">{_e(label)} · <span class="mode">{mode}</span></p>
<p class="refresh"><span id="status" aria-live="polite">auto-refresh every {refresh:g} s</span>
<button type="button" id="pause">Pause</button></p>
</header>
<nav class="controls">{_filters(data, job, status)}{token}</nav>
<main id="live">{body}</main>
<div id="message" class="banner" role="status" hidden></div>
</body>
</html>
"""
