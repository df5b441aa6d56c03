# Sourced by the scripts in deploy/: what they start is stopped when they end, however they end;
# they wait for a port to listen, and write the `flwr` connection to their SuperLink.
# A process still there STOP_GRACE_S [20] seconds after its stop signal is killed with its children:
# on a loaded machine, a SuperLink once took over two minutes to stop.
pids=()
declare -A stop_signal  # by pid: a process that SIGTERM would not stop at once, and the signal that does
stop_all() {
  # plora's services, the SuperLink and SuperNodes stop their own children on SIGTERM.
  for pid in "${pids[@]}"; do kill -"${stop_signal[$pid]:-TERM}" "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + ${STOP_GRACE_S:-20}))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "process $pid did not stop within ${STOP_GRACE_S:-20} s of its stop signal; killing it and its children" >&2
      kill_tree "$pid"
    fi
  done
  wait
}
kill_tree() {  # PID: it and its descendants, each frozen first so that it forks no child we miss
  kill -STOP "$1" 2>/dev/null || true
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  kill -KILL "$1" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT TERM

wait_for_port() {  # HOST PORT WHAT LOGS PID: until process PID listens there, or fail
  for ((tries = 0; tries < 240; tries++)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return
    if ! kill -0 "$5" 2>/dev/null; then
      echo "$3 ended before it listened on $1:$2; see $4" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "$3 did not come up on $1:$2; see $4" >&2
  exit 1
}

write_flower_connection() {  # ADDRESS CA: `flwr ... fleet` then uses this SuperLink, and starts no local one
  cat >"$FLWR_HOME/config.toml" <<END
[superlink]
default = "fleet"

[superlink.fleet]
address = "$1"
root-certificates = "$2"
END
}
