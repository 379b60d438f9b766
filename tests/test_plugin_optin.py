"""The pytest plugin is opt-in: installing coordlock changes nothing in a user's own test run.

A tiny user project (in a temporary directory, run by pytest in a subprocess) defines its own
``--backends`` option and its own ``soak`` marker — the names the plugin used when it loaded
itself into every run through a ``pytest11`` entry point, which crashed pytest at startup
(``option dest 'backends' already used``) and silently skipped the user's ``soak`` tests.
"""

from __future__ import annotations

from importlib.metadata import distribution, entry_points

import pytest

pytest_plugins = ["pytester"]

PLUGIN = "coordlock.testing.plugin"

USER_CONFTEST = """
def pytest_addoption(parser):
    parser.addoption("--backends", default="mine", help="the user's own option")

def pytest_configure(config):
    config.addinivalue_line("markers", "soak: the user's own long test")
"""

USER_TESTS = """
import pytest

@pytest.mark.soak
def test_users_soak_runs(request):
    assert request.config.getoption("--backends") == "mine"

def test_coordlock_plugin_loaded(request):
    names = {getattr(p, "__name__", "") for p in request.config.pluginmanager.get_plugins()}
    print("COORDLOCK_PLUGIN_LOADED", "coordlock.testing.plugin" in names)
"""

COORDLOCK_TESTS = """
import re
import pytest
import coordlock

def test_backend_url_works(backend_name, backend_url):
    assert backend_name == "memory"
    assert re.fullmatch(r"memory://t-[0-9a-f]{32}", backend_url)
    coordinator = coordlock.connect(backend_url)
    try:
        with coordinator.lock("job", ttl=5) as lease:
            assert lease.fence >= 1
    finally:
        coordinator.close()

@pytest.mark.coordlock_soak
def test_coordlock_soak_is_skipped():
    raise AssertionError("a coordlock_soak test runs only with --coordlock-soak")
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)  # entry points load
    monkeypatch.setenv("COORDLOCK_TEST_BACKENDS", "memory")
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_coordlock_is_installed_without_a_pytest11_entry_point() -> None:
    assert distribution("coordlock").version  # the installed package, not only a checkout
    stale = [ep for ep in entry_points(group="pytest11") if ep.value.startswith("coordlock")]
    assert not stale, f"a pytest11 entry point (stale install? `pip install -e .`): {stale}"


def test_installed_coordlock_stays_out_of_a_users_test_run(user_project: pytest.Pytester) -> None:
    result = user_project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--strict-markers", "-s", "-rs", timeout=120
    )
    result.assert_outcomes(passed=2)  # the user's soak test ran: not skipped, not crashed
    result.stdout.fnmatch_lines(["*COORDLOCK_PLUGIN_LOADED False*"])
    result.stdout.no_fnmatch_line("*coordlock backends:*")  # no report header from the plugin
    assert "already used" not in result.stderr.str()


def test_opting_in_with_dash_p_gives_the_fixtures(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(test_coordlock=COORDLOCK_TESTS)
    result = user_project.runpytest_subprocess(
        "-p", PLUGIN, "-p", "no:cacheprovider", "--strict-markers", "-s", "-v", "-rs",
        timeout=120,
    )  # fmt: skip
    result.assert_outcomes(passed=3, skipped=1)
    for line in (
        "*coordlock backends: memory*",
        "*test_backend_url_works?memory? PASSED*",
        "*COORDLOCK_PLUGIN_LOADED True*",
        "*test_users_soak_runs PASSED*",
        "*soak test: opt in with --coordlock-soak*",
    ):
        result.stdout.fnmatch_lines([line])


def test_opting_in_with_pytest_plugins_works_in_xdist_workers(
    user_project: pytest.Pytester,
) -> None:
    user_project.makeconftest(USER_CONFTEST + f"\npytest_plugins = [{PLUGIN!r}]\n")
    user_project.makepyfile(test_coordlock=COORDLOCK_TESTS)
    result = user_project.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "--strict-markers", "--coordlock-soak",
        "--backends=theirs-too", "-rs", timeout=180,
    )  # fmt: skip
    # --coordlock-soak runs the coordlock_soak test (which fails on purpose); the user's
    # --backends still reaches the user's own option, so their soak test fails the same way.
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*a coordlock_soak test runs only with --coordlock-soak*"])
    result.stdout.fnmatch_lines(["*assert 'theirs-too' == 'mine'*"])
