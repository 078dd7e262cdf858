# Sourced by run/grpc.sh, run/mqtt_s3.sh and run/cross_device.sh: start a cross-silo server and its workers,
# each under `timeout`; on exit stop exactly the processes started here (by PID), never by name.
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# background CMD...: run CMD under timeout, remember its PID in $last_pid
background() {
  timeout "$TIMEOUT" "$@" &
  last_pid=$!
  pids+=("$last_pid")
}

# launch_parties CONFIG WORKERS SERVER_HEAD_START_S [ARGS...]: the key files CONFIG names (fedml-prism keys
# --cf: created when missing, existing ones kept), then the server (rank 0), then ranks 1..WORKERS, each
# with ARGS (e.g. --resume, --output-dir DIR); waits for the server. If the server dies, the script exits
# and the workers are stopped: rerun it with --resume to continue from the server's last checkpoint with
# fresh workers (they hold no state but their data).
launch_parties() {
  local config="$1" workers="$2" head_start="$3" run_id="prism-$$" server rank
  shift 3
  "$BIN/fedml-prism" keys --cf "$config" --workers "$workers"
  background "$BIN/fedml-prism" run --cf "$config" --rank 0 --role server --run_id "$run_id" "$@"
  server=$last_pid
  sleep "$head_start"
  for rank in $(seq 1 "$workers"); do
    background "$BIN/fedml-prism" run --cf "$config" --rank "$rank" --role client --run_id "$run_id" "$@"
  done
  wait "$server"
}

# start_broker_and_s3: mosquitto on $MQTT_PORT and a local S3 endpoint (moto_server) on $S3_PORT with the
# bucket fedml-prism, both under timeout; returns when both listen
start_broker_and_s3() {
  MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  [ -x "$MOSQUITTO" ] || { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 2; }
  background "$MOSQUITTO" -p "$MQTT_PORT" >/dev/null 2>&1
  background "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1
  "$BIN/python" - "$S3_PORT" "$MQTT_PORT" <<'PY'
import socket, sys, time
import boto3
s3_port, mqtt_port = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 60
for port in (s3_port, mqtt_port):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.2)
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="testing",
             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="fedml-prism")
PY
}
