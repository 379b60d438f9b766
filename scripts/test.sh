#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the servers (OS packages) and the Python
# dependencies, lints, type-checks, builds the docs and runs pytest against real Redis,
# PostgreSQL and ZooKeeper servers that the tests start themselves on free loopback ports.
#
#   bash scripts/test.sh                 # everything (what CI runs)
#   bash scripts/test.sh -k sqlite       # extra arguments go to pytest
#
# Environment: PYTHON (default python3), COORDLOCK_TEST_WORKERS (pytest-xdist workers, default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"  # a backend server that cannot start is a failure here, never a skip
export PYTHONDONTWRITEBYTECODE=1

step() { printf '\n==> %s\n' "$*"; }

step "servers: Redis, PostgreSQL, ZooKeeper (OS packages, installed when missing)"
bash backends/install.sh

step "python environment (.venv, coordlock[all,dev])"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'

step "ruff"
.venv/bin/ruff check coordlock tests benchmarks examples

step "mypy --strict coordlock/"
.venv/bin/mypy

step "docs (mkdocs build --strict)"
site_dir="$(mktemp -d)"
.venv/bin/mkdocs build --strict --quiet --site-dir "$site_dir"
rm -rf "$site_dir"

step "pytest (real servers; soak tests are opt-in with --coordlock-soak)"
status=0
.venv/bin/python -m pytest -n "${COORDLOCK_TEST_WORKERS:-3}" -m "not coordlock_soak" -p no:cacheprovider \
    --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
