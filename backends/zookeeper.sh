#!/bin/sh
# Start a throwaway single-node ZooKeeper on a free 127.0.0.1 port.
# Data in a temp dir, removed on exit.
# Prints URL=<url>; Ctrl-C stops it. Options: see `zookeeper.sh --help`.
exec "$(dirname -- "$0")/_server.sh" zookeeper "$@"
