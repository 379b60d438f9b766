#!/bin/sh
# Start a throwaway 3-node ZooKeeper ensemble on free 127.0.0.1 ports (--size N for more).
# Data in temp dirs, removed on exit.
# Prints URL=<url>; Ctrl-C stops it. Options: see `zookeeper-ensemble.sh --help`.
exec "$(dirname -- "$0")/_server.sh" zookeeper-ensemble "$@"
