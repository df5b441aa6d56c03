# Sourced by the scripts in deploy/: what they start is stopped when they end, however they end;
# they wait for a port to listen, and write the `flwr` connection to their SuperLink.
pids=()
declare -A stop_signal  # by pid: a process that SIGTERM would not stop at once, and the signal that does
stop_all() {
  # plora's services, the SuperLink and SuperNodes stop their own children on SIGTERM.
  for pid in "${pids[@]}"; do kill -"${stop_signal[$pid]:-TERM}" "$pid" 2>/dev/null || true; done
  wait
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
