"""The backend contract suite, run against every selected backend (see the pytest plugin)."""

from coordlock.testing.contract import CoordinatorContract


class TestContract(CoordinatorContract):
    """Every behaviour of :class:`CoordinatorContract`, once per backend URL."""
