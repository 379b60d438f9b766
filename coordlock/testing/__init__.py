"""Test support for coordlock: throwaway real servers (:mod:`coordlock.testing.servers`), a
loopback fault proxy (:mod:`coordlock.testing.faultproxy`), the backend contract suite
(:mod:`coordlock.testing.contract`) and an opt-in pytest plugin (:mod:`coordlock.testing.plugin`:
``pytest -p coordlock.testing.plugin`` or ``pytest_plugins = ["coordlock.testing.plugin"]``;
it never loads by itself)."""
