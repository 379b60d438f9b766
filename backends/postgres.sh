#!/bin/sh
# Start a throwaway PostgreSQL on a free 127.0.0.1 port (data in a temp dir, removed on exit).
# Prints URL=<url>; Ctrl-C stops it. Options: see `postgres.sh --help`.
exec "$(dirname -- "$0")/_server.sh" postgres "$@"
