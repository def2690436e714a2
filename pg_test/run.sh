#!/bin/bash
# Run the pg_baton SQL regression tests (pg_regress) against a running server.
#
#   pg_test/run.sh HOST PORT [DBNAME]
#
# The server must have the pg_baton extension installed (cargo pgrx install)
# and contrib's dblink (the concurrency test opens a second session with it).
# If pg_baton is in shared_preload_libraries, restart the server after
# reinstalling it: backends keep the library the postmaster loaded.
# DBNAME (default baton_regress) is dropped and created afresh; the first test
# creates the extension in it. Results go to pg_test/results/; on failure the
# differences are printed and the exit status is non-zero.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 HOST PORT [DBNAME]" >&2
    exit 2
fi
HOST=$1
PORT=$2
DB=${3:-baton_regress}
USER_NAME=postgres

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_REGRESS=${PG_REGRESS:-/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress}
OUT=$DIR/results

psql_admin() {
    PGOPTIONS="-c client_min_messages=warning" \
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U "$USER_NAME" -d postgres "$@"
}

# A fresh database, set up the way pg_regress sets up its own databases.
psql_admin -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)"
psql_admin -c "CREATE DATABASE \"$DB\" TEMPLATE template0"
psql_admin -c "ALTER DATABASE \"$DB\" SET lc_messages TO 'C';
               ALTER DATABASE \"$DB\" SET lc_monetary TO 'C';
               ALTER DATABASE \"$DB\" SET lc_numeric TO 'C';
               ALTER DATABASE \"$DB\" SET lc_time TO 'C';
               ALTER DATABASE \"$DB\" SET bytea_output TO 'hex';
               ALTER DATABASE \"$DB\" SET timezone_abbreviations TO 'Default';"

rm -rf "$OUT"
mkdir -p "$OUT"
status=0
"$PG_REGRESS" \
    --use-existing \
    --bindir="$PG_BIN" \
    --host="$HOST" --port="$PORT" --user="$USER_NAME" \
    --dbname="$DB" \
    --inputdir="$DIR" \
    --outputdir="$OUT" \
    --schedule="$DIR/schedule" || status=$?

if [ "$status" -ne 0 ]; then
    if [ -s "$OUT/regression.diffs" ]; then
        echo "=== $OUT/regression.diffs ===" >&2
        cat "$OUT/regression.diffs" >&2
    fi
    echo "pg_baton regression tests FAILED (pg_regress exit status $status)" >&2
    exit "$status"
fi
echo "pg_baton regression tests passed"
