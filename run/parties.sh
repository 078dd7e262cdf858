# Sourced by run/grpc.sh and run/mqtt_s3.sh: start a cross-silo server and its workers, each under
# `timeout`; on exit stop exactly the processes started here (by PID), never by name.
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# background CMD...: run CMD under timeout, remember its PID in $last_pid
background() {
  timeout "$TIMEOUT" "$@" &
  last_pid=$!
  pids+=("$last_pid")
}

# launch_parties CONFIG WORKERS SERVER_HEAD_START_S: server (rank 0), then ranks 1..WORKERS; waits for the server
launch_parties() {
  local config="$1" workers="$2" head_start="$3" run_id="prism-$$" server rank
  background "$BIN/fedml-prism" run --cf "$config" --rank 0 --role server --run_id "$run_id"
  server=$last_pid
  sleep "$head_start"
  for rank in $(seq 1 "$workers"); do
    background "$BIN/fedml-prism" run --cf "$config" --rank "$rank" --role client --run_id "$run_id"
  done
  wait "$server"
}
