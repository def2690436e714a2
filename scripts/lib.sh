# Shared helpers for scripts/setup and scripts/test. Source it; do not run it.
# Every cluster here is private: its own data directory under /tmp and its own
# port, never the system one.

PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Run a command as the postgres OS user (PostgreSQL refuses to run as root).
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# apt packages, cargo-pgrx, pgrx init. Idempotent: skips what is there.
install_deps() {
    if ! [ -x "$PG_CONFIG" ] || ! dpkg -s libclang-dev python3-psycopg iptables >/dev/null 2>&1; then
        log "installing PostgreSQL 15 and build packages (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-server-dev-15 \
            postgresql-client-15 libclang-dev clang pkg-config libssl-dev python3 python3-psycopg \
            ca-certificates iptables >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install Rust (rustup) first" >&2; exit 1
    fi
    if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx 0.18.1" ]; then
        log "installing cargo-pgrx 0.18.1 (takes a few minutes)"
        cargo install cargo-pgrx --version 0.18.1 --locked
    fi
    if ! grep -q "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
        cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
    fi
}

# Build the extension and install it into PostgreSQL 15's lib and share dirs.
install_extension() {
    log "building and installing the pg_baton extension (${BATON_PROFILE:-release})"
    local flag=--release
    [ "${BATON_PROFILE:-release}" = debug ] && flag=
    (cd "$REPO" && cargo pgrx install $flag --pg-config "$PG_CONFIG" >/dev/null)
    # The install scripts of released versions, so that a database can be
    # created at one and upgraded (cargo pgrx copies only the upgrade scripts).
    install -m 644 "$REPO"/sql/released/pg_baton--*.sql "$("$PG_CONFIG" --sharedir)/extension/"
}

# start_cluster NAME PORT DATABASE: a private cluster with pg_baton preloaded and
# its background worker serving DATABASE (created here), in /tmp/pg_baton-NAME.
start_cluster() {
    local name=$1 port=$2 db=$3 dir=/tmp/pg_baton-$1
    stop_cluster "$name"
    rm -rf "$dir"; install -d -o postgres -g postgres "$dir"
    as_postgres "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --locale=C.UTF-8 >/dev/null
    cat >> "$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
shared_preload_libraries = 'pg_baton'
baton.database = '$db'
baton.interval = ${BATON_INTERVAL:-1s}
max_connections = 100
shared_buffers = ${BATON_SHARED_BUFFERS:-128MB}
fsync = ${BATON_FSYNC:-on}
log_min_messages = ${BATON_LOG_LEVEL:-warning}
${BATON_EXTRA_CONF:-}
CONF
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    as_postgres "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
    log "PostgreSQL 15 on 127.0.0.1:$port (data $dir/data, log $dir/server.log)"
}

stop_cluster() {
    local dir=/tmp/pg_baton-$1
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}
