"""coordlock's own tests use its pytest plugin, which is opt-in (it never loads into a user's
test run by itself): throwaway servers, fault proxies, ``backend_url`` parametrization and the
``--coordlock-backends`` / ``--coordlock-soak`` options. See docs/testing.md."""

import os
from importlib.metadata import entry_points

PLUGIN = "coordlock.testing.plugin"

# An install made before the plugin became opt-in (a stale coordlock.egg-info in the checkout,
# or site-packages metadata) still names it under the ``pytest11`` entry point, so pytest has
# loaded it already, and loading it twice is an error. `pip install -e .` removes the stale
# entry point; until then, do not load it again.
_autoloaded = os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "") == "" and any(
    ep.value == PLUGIN for ep in entry_points(group="pytest11")
)

pytest_plugins = [] if _autoloaded else [PLUGIN]
