# Sourced by the side-by-side scripts: start/stop one server at a time and wait until it
# answers. The caller sets SERVER_PID after starting a server in the background.
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

wait_ready() { # base-url path
  for _ in $(seq 600); do
    if curl -sf "$1$2" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "$1 never became ready" >&2
  return 1
}
