#!/usr/bin/env bash
# Every ```sql block of the docs (docs/*.md), in order, against a fresh
# database of a running server (pg_baton installed): a snippet that no longer
# runs fails the suite. Blocks of one file share one psql session, so that
# \gset variables carry over.
#
#   pg_test/docs.sh HOST PORT
set -euo pipefail
HOST=$1 PORT=$2
DOCS=$(cd "$(dirname "$0")/../docs" && pwd)
PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PORT" -U postgres)
for doc in "$DOCS"/*.md; do
    db=baton_docs
    PGOPTIONS="-c client_min_messages=warning" "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    "${PSQL[@]}" -d $db -c "CREATE EXTENSION pg_baton"
    blocks=$(awk '/^```sql$/ {on = 1; n++; next} /^```$/ {on = 0} on' "$doc")
    count=$(grep -c '^```sql$' "$doc" || true)
    if ! out=$(printf '%s\n' "$blocks" | "${PSQL[@]}" -d $db 2>&1); then
        echo "$out" >&2
        echo "docs test FAILED: a snippet of $(basename "$doc") does not run" >&2
        exit 1
    fi
    "${PSQL[@]}" -d postgres -c "DROP DATABASE $db WITH (FORCE)"
    echo "docs: $count SQL snippet(s) of $(basename "$doc") ran"
done
