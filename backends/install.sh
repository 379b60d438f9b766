#!/bin/sh
# Install the servers coordlock's tests and benchmarks start (Debian/Ubuntu, as root).
# Idempotent: checks the binaries first and installs only the packages that are missing:
#   redis-server (redis-server, also runs Sentinel), postgresql (initdb/postgres/psql/pg_isready),
#   zookeeper (/usr/share/java/zookeeper.jar), default-jre-headless (java),
#   chromium (the dashboard's browser tests drive it with Playwright).
# Nothing is started or enabled here: the tests start their own servers on free loopback ports.
set -eu

missing=""
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing="$missing redis-server"

have_pg=""
for bindir in /usr/lib/postgresql/*/bin; do
    if [ -x "$bindir/initdb" ] && [ -x "$bindir/postgres" ] && [ -x "$bindir/psql" ]; then
        have_pg=yes
    fi
done
command -v initdb >/dev/null 2>&1 && have_pg=yes
[ -n "$have_pg" ] || missing="$missing postgresql"

[ -f /usr/share/java/zookeeper.jar ] || missing="$missing zookeeper"
command -v java >/dev/null 2>&1 || missing="$missing default-jre-headless"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"

if [ -z "$missing" ]; then
    echo "install.sh: nothing to install (redis-server, postgresql, zookeeper, java, chromium present)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        as_root="sudo"
    else
        echo "install.sh: missing:$missing; run me as root (apt-get needs it)" >&2
        exit 1
    fi
else
    as_root=""
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: missing:$missing; no apt-get here: install them with your package manager" >&2
    exit 1
fi

echo "install.sh: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # word splitting of $missing is intended
$as_root apt-get update
# shellcheck disable=SC2086
$as_root apt-get install -y --no-install-recommends $missing
echo "install.sh: installed:$missing"
