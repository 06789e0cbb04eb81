#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer where DISPATCH_REDIS_URL / DISPATCH_DATABASE_URL
# point (local defaults otherwise). When nothing answers on a local address, start a
# private server from the machine's binaries under .local/ and say so.
# `services.sh stop` stops the private servers this script started (and nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCAL="$PWD/.local"
STARTED="$LOCAL/services.started"  # one line per private server we started
REDIS_URL="${DISPATCH_REDIS_URL:-redis://127.0.0.1:6379/0}"
DATABASE_URL="${DISPATCH_DATABASE_URL:-postgresql://127.0.0.1:5432/test}"

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: %s\n' "$*" >&2; exit 1; }

# host and port of a URL like scheme://[user@]host:port/path
url_host() { local rest="${1#*://}"; rest="${rest#*@}"; rest="${rest%%/*}"; echo "${rest%%:*}"; }
url_port() { local rest="${1#*://}"; rest="${rest#*@}"; rest="${rest%%/*}"; [[ "$rest" == *:* ]] && echo "${rest##*:}" || echo "$2"; }
url_db() { local rest="${1#*://}"; rest="${rest#*/}"; rest="${rest%%\?*}"; echo "${rest:-test}"; }
is_local() { [[ "$1" == 127.0.0.1 || "$1" == localhost || "$1" == ::1 ]]; }

redis_ok() { python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"PING\r\n"); sys.exit(0 if s.recv(64).startswith((b"+PONG", b"-NOAUTH")) else 1)
except OSError:
    sys.exit(1)
PY
}

ensure_redis() {
  local host port; host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
  if redis_ok "$host" "$port"; then say "Redis answers at $host:$port"; return; fi
  is_local "$host" || die "Redis at $host:$port does not answer; start it or fix DISPATCH_REDIS_URL"
  command -v redis-server >/dev/null || die "Redis does not answer at $host:$port and redis-server is not installed (apt-get install redis-server)"
  mkdir -p "$LOCAL/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$LOCAL/redis" --appendonly yes \
    --appendfsync everysec --daemonize yes --pidfile "$LOCAL/redis/redis.pid" \
    --logfile "$LOCAL/redis/redis.log" >/dev/null
  for _ in $(seq 50); do redis_ok "$host" "$port" && break; sleep 0.1; done
  redis_ok "$host" "$port" || die "started redis-server but it does not answer; see $LOCAL/redis/redis.log"
  echo "redis $port" >> "$STARTED"
  say "started a private Redis (AOF everysec) on $host:$port, data in $LOCAL/redis"
}

pg_bindir() {
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_postgres() {
  local host port db user; host=$(url_host "$DATABASE_URL"); port=$(url_port "$DATABASE_URL" 5432)
  db=$(url_db "$DATABASE_URL"); user="${PGUSER:-$(id -un)}"
  if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
    say "PostgreSQL answers at $host:$port"
  else
    is_local "$host" || die "PostgreSQL at $host:$port does not answer; start it or fix DISPATCH_DATABASE_URL"
    local bin; bin=$(pg_bindir)
    [ -n "$bin" ] && [ -x "$bin/initdb" ] || die "PostgreSQL does not answer at $host:$port and no server binaries were found (apt-get install postgresql)"
    local data="$LOCAL/pg" run=()
    # PostgreSQL refuses to run as root: run the private cluster as the postgres user.
    if [ "$(id -u)" = 0 ]; then id postgres >/dev/null 2>&1 || die "running as root and there is no postgres user to run a private PostgreSQL"; run=(runuser -u postgres --); fi
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres "$data"
    if [ ! -f "$data/PG_VERSION" ]; then
      "${run[@]}" "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
    fi
    "${run[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
      -o "-p $port -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
    "${run[@]}" psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qtAc \
      "DO \$\$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$user') THEN CREATE ROLE \"$user\" LOGIN SUPERUSER; END IF; END\$\$" >/dev/null
    echo "postgres $data" >> "$STARTED"
    say "started a private PostgreSQL on $host:$port, data in $data"
  fi
  if ! psql -h "$host" -p "$port" -d postgres -qtAc "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null | grep -q 1; then
    createdb -h "$host" -p "$port" "$db" 2>/dev/null && say "created database $db" || true
  fi
  psql -h "$host" -p "$port" -d "$db" -qtAc 'SELECT 1' >/dev/null 2>&1 \
    || die "cannot connect to database $db at $host:$port as $user; grant access or fix DISPATCH_DATABASE_URL"
}

stop_started() {
  [ -f "$STARTED" ] || return 0
  while read -r kind where; do
    case "$kind" in
      redis) redis-cli -p "$where" shutdown >/dev/null 2>&1 && say "stopped the private Redis on port $where" ;;
      postgres)
        local run=(); [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
        "${run[@]}" "$(pg_bindir)/pg_ctl" -D "$where" stop -m fast >/dev/null 2>&1 \
          && say "stopped the private PostgreSQL in $where" ;;
    esac
  done < "$STARTED"
  rm -f "$STARTED"
}

if [ "${1:-}" = stop ]; then stop_started; exit 0; fi
mkdir -p "$LOCAL"
ensure_redis
ensure_postgres
