"""``zookeeper://h1:2181,h2:2181/chroot`` – locks on a ZooKeeper ensemble, through kazoo.

Modules, one job each:

* ``coordinator`` – :class:`ZooKeeperCoordinator`: the backend hooks, wiring the parts below.
* ``_options`` – URL and option parsing, node ACLs, TLS settings (fail fast on bad input).
* ``_session`` – the kazoo client (one ZooKeeper session), fork safety, permanent-failure
  diagnosis; ``_clock`` – the lower bound of the server clock used to judge expiry.
* ``_locks`` – lock nodes: queue, holder, waiters, release, orphan cleanup.
* ``_states`` – connection states (SUSPENDED / LOST / CONNECTED) wired to leases; the sweep.
* ``_claims`` – once-only claims and the cleanup sweep; ``_history`` – run history, listing.
* ``_layout`` – node names and node data (pure functions).

Layout under the optional chroot: ``/coordlock/locks/<name>/<owner>-lock-<seq>`` (ephemeral
sequential, data = ttl in ms), ``/coordlock/claims/<key>/<token>``, ``/coordlock/runs/<job>/
<run_id>``, ``/coordlock/clock``. See ``docs/backends/zookeeper.md``.
"""

from ._layout import escape
from .coordinator import ZooKeeperCoordinator

__all__ = ["ZooKeeperCoordinator", "escape"]
