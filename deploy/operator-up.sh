#!/usr/bin/env bash
# The operator's side of plora on one host: a PostgreSQL registry, backbone replicas that share
# it, and the fleet's SuperLink, every one of them reached at HOST over TLS. Device hosts then
# need only the CA certificate and their own SuperNode key (deploy/README.md, "Hosts of their own").
# It runs in the foreground and stops everything it started on Ctrl-C or SIGTERM.
#
# Usage: deploy/operator-up.sh ROOT HOST SUPERNODES [SERVE-OPTION ...]
#   ROOT          the operator's folder: registry, credentials, Flower's state, logs (made owner-only)
#   HOST          the IP address or name the device hosts reach this host at
#   SUPERNODES    device hosts to issue SuperNode keys and enrollment uses for
#   SERVE-OPTION  more options of `plora backbone serve` for every replica, e.g. --backbone DIR
# Environment (defaults in brackets):
#   REPLICAS [2]            backbone replicas, on ports BACKBONE_PORT, BACKBONE_PORT + 1, ...
#   BACKBONE_PORT [50051]   their metrics on METRICS_PORT + i [9464], on loopback only
#   SUPERLINK_PORT [9093]   the SuperLink's one port, for SuperNodes and `flwr` alike
#   PLORA_DB_URL            an existing PostgreSQL database to use; otherwise one is started:
#   PG_BIN PG_PORT [5432]   the folder of initdb and postgres [where postgres is on PATH]
#   PG_USER [nobody]        the user PostgreSQL runs as when this script runs as root
#   STOP_GRACE_S [20]       on exit, how long a process may take to stop before it is killed
# What it writes under ROOT: tls/ (ca.pem, the replicas' and SuperLink's certificate, each
# SuperNode's key pair), db-url and enroll-token (secrets: owner-only), flower/ (the SuperLink's
# FLWR_HOME: `FLWR_HOME=ROOT/flower flwr run APP fleet` submits a run), replica-N.pid, logs/.
# When everything is up it prints one line: "operator up: backbone A,B superlink C".
set -euo pipefail

usage="usage: $0 ROOT HOST SUPERNODES [SERVE-OPTION ...]"
root=$(realpath -m "${1:?$usage}")
host=${2:?$usage}
supernodes=${3:?$usage}
shift 3
replicas=${REPLICAS:-2} backbone_port=${BACKBONE_PORT:-50051} metrics_port=${METRICS_PORT:-9464}
link_port=${SUPERLINK_PORT:-9093} pg_port=${PG_PORT:-5432} pg_user=${PG_USER:-nobody}

mkdir -p "$root/logs"
chmod 711 "$root"  # others may pass through to PostgreSQL's own folder, and read nothing
chmod 700 "$root/logs"
logs=$root/logs tls=$root/tls
export FLWR_HOME="$root/flower" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
chmod 700 "$FLWR_HOME"

source "$(dirname "$(realpath "$0")")/processes.sh"

secret() { head -c 24 /dev/urandom | base64 | tr '+/' '-_'; }
write_secret() { (umask 077 && printf '%s\n' "$2" >"$1"); }

rm -rf "$tls"  # fresh credentials for this host name: the CA's key is never kept
plora fleet credentials "$tls" --supernodes "$supernodes" --host "$host" >/dev/null

if [[ -z ${PLORA_DB_URL:-} ]]; then
  pg_bin=${PG_BIN:-$(dirname "$(command -v postgres)")}
  data=$root/postgres
  as_pg_user=()
  if ((EUID == 0)); then  # PostgreSQL refuses to run as root
    as_pg_user=(setpriv --reuid="$pg_user" --regid="$(id -g "$pg_user")" --clear-groups --)
  fi
  if [[ ! -s $data/PG_VERSION ]]; then
    rm -rf "$data"
    mkdir -m 700 "$data"
    ((EUID == 0)) && chown "$pg_user:" "$data"
    password=$(secret)
    write_secret "$root/db-password" "$password"
    ((EUID == 0)) && chown "$pg_user:" "$root/db-password"
    "${as_pg_user[@]}" "$pg_bin/initdb" -D "$data" -U plora --pwfile="$root/db-password" --auth=scram-sha-256 \
      --encoding=UTF8 --locale=C --no-instructions >"$logs/initdb.log" 2>&1
    rm "$root/db-password"
    # Replicas on other hosts of this host's networks may connect too, with the password.
    echo "host all plora samenet scram-sha-256" >>"$data/pg_hba.conf"
    write_secret "$root/db-url" "postgresql+psycopg://plora:$password@$host:$pg_port/postgres"
  fi
  "${as_pg_user[@]}" "$pg_bin/postgres" -D "$data" -c "listen_addresses=$host" -c "port=$pg_port" \
    -c "unix_socket_directories=$data" >"$logs/postgres.log" 2>&1 &
  pids+=($!)
  stop_signal[$!]=INT  # a fast shutdown: SIGTERM's smart one waits for every client to leave, the operator's own too
  wait_for_port "$host" "$pg_port" PostgreSQL "$logs" $!
  PLORA_DB_URL=$(<"$root/db-url")
fi
export PLORA_DB_URL  # in the environment, not on command lines that `ps` shows

# The SuperLink starts while the replicas load their backbone.
flower-superlink --ssl-ca-certfile "$tls/ca.pem" --ssl-certfile "$tls/server.pem" --ssl-keyfile "$tls/server.key" \
  --enable-supernode-auth --host "$host" --port "$link_port" >"$logs/superlink.log" 2>&1 &
pids+=($!)
link_pid=$!

# The replicas start together: each registers the version it serves on first sight, and the
# registry lets exactly one of them add it (the others find it); one writes the device bundle
# they share, the others wait for it. The rest of the set-up runs while they load their backbone.
addresses=() replica_pids=()
declare -A replica_of
for ((i = 0; i < replicas; i++)); do
  plora backbone serve --host "$host" --port $((backbone_port + i)) --http-port $((metrics_port + i)) \
    --tls-cert "$tls/server.pem" --tls-key "$tls/server.key" "$@" >"$logs/replica-$i.log" 2>&1 &
  pids+=($!)
  replica_of[$!]=$i
  replica_pids+=($!)
  echo $! >"$root/replica-$i.pid"
  addresses+=("$host:$((backbone_port + i))")
done
write_secret "$root/enroll-token" "$(plora backbone enroll create --uses "$supernodes" --label "operator-up $host" 2>>"$logs/enroll.log")"

write_flower_connection "$host:$link_port" "$tls/ca.pem"
wait_for_port "$host" "$link_port" "the SuperLink" "$logs" "$link_pid"
for ((i = 0; i < supernodes; i++)); do
  flwr supernode register "$tls/supernode-$(printf %03d "$i").pub" fleet --format json >/dev/null
done
for ((i = 0; i < replicas; i++)); do
  wait_for_port "$host" $((backbone_port + i)) "backbone replica $i" "$logs" "${replica_pids[i]}"
done

echo "operator up: backbone $(IFS=,; echo "${addresses[*]}") superlink $host:$link_port"
# Devices carry on at another replica when one dies; without the registry, the SuperLink or
# every replica, the operator's side is down.
live_replicas=$replicas
while true; do
  ended=
  wait -n -p ended "${pids[@]}" || true
  remaining=()
  for pid in "${pids[@]}"; do [[ $pid == "$ended" ]] || remaining+=("$pid"); done
  pids=("${remaining[@]}")
  if [[ -n $ended && ${replica_of[$ended]+set} ]] && ((--live_replicas > 0)); then
    echo "backbone replica ${replica_of[$ended]} ended; $live_replicas still serve. See $logs" >&2
    continue
  fi
  echo "the operator's side is down (process ${ended:-?} ended); see $logs" >&2
  exit 1
done
