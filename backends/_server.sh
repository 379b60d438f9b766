#!/bin/sh
# Shared helper of the backends/*.sh wrappers: run one throwaway server in the foreground.
# Usage: backends/_server.sh KIND [options]   (KIND: redis postgres zookeeper zookeeper-ensemble
# sentinel). Prints URL=<url> once the server answers; Ctrl-C / SIGTERM stop it cleanly.
# Python: $PYTHON, else the repository's .venv/bin/python, else python3.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
repo=$(dirname -- "$here")
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    py=$repo/.venv/bin/python
else
    py=python3
fi
# Works from a checkout even when coordlock is not installed into that interpreter.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "$py" -m coordlock.testing.servers "$@"
