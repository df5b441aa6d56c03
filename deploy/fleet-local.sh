#!/usr/bin/env bash
# A plora fleet on Flower's deployment engine, all on loopback: one SuperLink, one SuperNode per
# device, then one run of the Flower App in deploy/fleet-app. On a real fleet the same commands
# run on separate machines: flower-superlink on the server, flower-supernode on each phone or PC.
# Flower's traffic is TLS, and the SuperLink admits only the SuperNodes whose public keys were
# registered with it (`plora fleet credentials` makes the certificate and keys; on separate
# machines, give it --host for the SuperLink's name and copy each SuperNode its own key only).
# `plora fleet launch --engine deployment` does all of this itself, on free ports, and starts a
# backbone service too.
#
# Usage: deploy/fleet-local.sh DEVICES BACKBONE [ROOT] [KEY=VALUE ...]
#   DEVICES    SuperNodes to start, one per device
#   BACKBONE   HOST:PORT of a running backbone service on loopback, for example from
#              `plora backbone serve --insecure --port 50051`
#   ROOT       folder for the devices, rounds.jsonl and Flower's state and logs (default plora-fleet)
#   KEY=VALUE  more of the run config (deploy/fleet-app/pyproject.toml), e.g. rounds=3 steps=20
#              'data="/abs/path/notes.jsonl"' (strings in double quotes); new devices need
#              "enroll-token=\"$(plora backbone enroll create --uses DEVICES)\"" (the service's registry)
# Ports: the SuperLink on $SUPERLINK_PORT (default 9300), SuperNode i on $SUPERLINK_PORT + 1 + i.
# Exits non-zero unless the run completed; every process it started is stopped on exit.
set -euo pipefail

devices=${1:?usage: $0 DEVICES BACKBONE [ROOT] [KEY=VALUE ...]}
backbone=${2:?usage: $0 DEVICES BACKBONE [ROOT] [KEY=VALUE ...]}
root=$(realpath -m "${3:-plora-fleet}")
shift $(($# < 3 ? $# : 3))
link_port=${SUPERLINK_PORT:-9300}
app=$(dirname "$(realpath "$0")")/fleet-app

# Flower offline, and its state in a private FLWR_HOME rather than ~/.flwr.
export FLWR_HOME="$root/flower" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
logs=$FLWR_HOME/logs tls=$FLWR_HOME/tls
mkdir -p "$logs"
rm -rf "$tls"  # a run of its own: fresh credentials for its SuperLink and SuperNodes
plora fleet credentials "$tls" --supernodes "$devices" >/dev/null
source "$(dirname "$(realpath "$0")")/processes.sh"
write_flower_connection "127.0.0.1:$link_port" "$tls/ca.pem"

flower-superlink --ssl-ca-certfile "$tls/ca.pem" --ssl-certfile "$tls/server.pem" --ssl-keyfile "$tls/server.key" \
  --enable-supernode-auth --host 127.0.0.1 --port "$link_port" >"$logs/superlink.log" 2>&1 &
pids+=($!)
wait_for_port 127.0.0.1 "$link_port" "the SuperLink" "$logs" $!
for ((i = 0; i < devices; i++)); do
  node=$(printf %03d "$i")
  flwr supernode register "$tls/supernode-$node.pub" fleet --format json >/dev/null
  flower-supernode --superlink "127.0.0.1:$link_port" --root-certificates "$tls/ca.pem" \
    --auth-supernode-private-key "$tls/supernode-$node.key" --port $((link_port + 1 + i)) \
    --node-config "partition-id=$i num-partitions=$devices" >"$logs/supernode-$node.log" 2>&1 &
  pids+=($!)
done

run_id=$(flwr run "$app" fleet --format json \
  --run-config "fleet-root=\"$root\" backbone=\"$backbone\" devices=$devices $*" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["run-id"])')
echo "run $run_id; logs in $logs"
flwr log "$run_id" fleet --stream
# `flwr log --stream` (like `flwr run --stream`) exits 0 whatever became of the run: ask.
status=$(flwr ls fleet --run-id "$run_id" --format json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $run_id: $status"
[[ $status == finished:completed ]]
