"""A tiny web app (standard library only) that starts the scheduler at startup.

Run several copies — on different ports here, on different servers in real life — against one
backend, and each job still runs once per tick across all of them::

    export COORDLOCK_URL=sqlite:///coordlock-example.db     # or redis://..., postgresql://...
    python examples/webapp.py 8001 &
    python examples/webapp.py 8002 &
    curl -s localhost:8001/jobs

``GET /jobs`` shows each job's next run and last result on this copy; ``GET /healthz`` says
whether its scheduler is running. ``Ctrl-C``/``SIGTERM`` stop the server and the scheduler,
letting running jobs finish.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

import coordlock
from coordlock.scheduler import current_run

log = logging.getLogger("example")

# One scheduler per process, created at import time like the app itself. The coordinator is
# looked up when start() runs, so configure() may happen later (in main()).
sched = coordlock.Scheduler(timezone="Europe/Berlin")


@sched.every(10, name="refresh-cache")
def refresh_cache() -> None:
    ctx = current_run()
    log.info("refreshing the cache for tick %s", ctx.tick if ctx else "?")


@sched.cron("*/2 * * * *", name="send-digest", retries=2, backoff=5, timeout=60)
def send_digest() -> None:
    log.info("sending the digest")


@sched.cron(
    "30 2 * * *", name="nightly-export", misfire="run_once", isolation="process", timeout=3600
)
def nightly_export() -> None:
    # isolation="process": killed at the timeout; misfire="run_once": if every copy was down
    # at 02:30 (Berlin time, DST handled like cron), the first copy to start runs it once.
    log.info("exporting")


@sched.on("failed")
def report_failure(event: coordlock.scheduler.Event) -> None:
    log.error("job %s failed on %s: %s", event.key, event.instance, event.error)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200 if sched.running else 503, {"scheduler": sched.running})
        elif self.path == "/jobs":
            jobs = [
                {
                    "name": j.name,
                    "trigger": j.trigger,
                    "next_run": j.next_run.isoformat() if j.next_run else None,
                    "last_tick": j.last_tick.isoformat() if j.last_tick else None,
                    "last_status": j.last_status,
                    "last_error": j.last_error,
                    "running": j.running,
                }
                for j in sched.jobs()
            ]
            self._send(200, {"instance": sched.instance_id, "jobs": jobs})
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # quieter access log
        log.debug(format, *args)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    port = int(argv[1]) if len(argv) > 1 else 8000
    coordlock.configure(os.environ.get("COORDLOCK_URL", "sqlite:///coordlock-example.db"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def shutdown(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown).start()  # shutdown() blocks: not here

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    sched.start()  # at startup, next to the web server
    log.info("listening on http://127.0.0.1:%d (scheduler %s)", port, sched.instance_id)
    try:
        server.serve_forever()
    finally:
        sched.stop(wait=True)  # lets running jobs finish (shutdown_grace, 30 s by default)
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
