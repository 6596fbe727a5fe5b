#!/usr/bin/env bash
# The seeds' load test, end to end: build, start FireMode (embedded store unless
# DATABASE_URL is set), run Locust headless with 500 users for 2 minutes, stop FireMode.
# Exits non-zero when the classify p95 is over 300 ms or any request failed.
#   tests/load/run.sh            # from the repository root
#   USERS=100 RUN_TIME=30s tests/load/run.sh
#   LOCUSTFILE=tests/load/spread_locustfile.py tests/load/run.sh   # the spread-out variant
set -euo pipefail
cd "$(dirname "$0")/../.."
USERS=${USERS:-500}
SPAWN_RATE=${SPAWN_RATE:-10}
RUN_TIME=${RUN_TIME:-2m}
LOCUSTFILE=${LOCUSTFILE:-tests/load/locustfile.py}
work=$(mktemp -d /tmp/fm-load.XXXX)
trap 'kill -TERM "$fm_pid" 2>/dev/null || true; wait "$fm_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -r tests/load/requirements.txt
cargo build --release --quiet

cat > "$work/firemode.toml" <<TOML
data_dir = "$work/data"
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19090"
[supervisor]
runtime_dir = "$work/run"
[database]
url = "${DATABASE_URL:-}"
[telemetry]
log_format = "json"
TOML
ulimit -n 65536 || true
RUST_LOG=warn ./target/release/firemode --config "$work/firemode.toml" 2> "$work/firemode.log" &
fm_pid=$!
for _ in $(seq 1 100); do
    curl -fs http://127.0.0.1:19090/readyz >/dev/null && break
    sleep 0.2
done
curl -fs http://127.0.0.1:19090/readyz >/dev/null
export FM_BIN=./target/release/firemode FM_CONFIG="$work/firemode.toml"
status=0
"$work/venv/bin/locust" -f "$LOCUSTFILE" --headless -u "$USERS" -r "$SPAWN_RATE" \
    --run-time "$RUN_TIME" --host http://127.0.0.1:18080 --only-summary || status=$?
# The same run as FireMode measured it, without the load generator's own delays.
curl -fs http://127.0.0.1:19090/metrics | python3 tests/load/server_latency.py || true
exit "$status"
