#!/bin/sh
# Start a throwaway Redis master plus a real Sentinel watching it (free 127.0.0.1 ports).
# Data in a temp dir, removed on exit.
# Prints URL=<url>; Ctrl-C stops it. Options: see `sentinel.sh --help`.
exec "$(dirname -- "$0")/_server.sh" sentinel "$@"
