"""Test support for coordlock: throwaway real servers (:mod:`coordlock.testing.servers`) and the
pytest plugin (:mod:`coordlock.testing.plugin`, loaded through the ``pytest11`` entry point)."""
