#!/bin/sh
# Start a throwaway Redis on a free 127.0.0.1 port (data in a temp dir, removed on exit).
# Prints URL=<url>; Ctrl-C stops it. Options: see `redis.sh --help`.
exec "$(dirname -- "$0")/_server.sh" redis "$@"
