#!/usr/bin/env bash
# Runs Drover for real on this machine: a coordinator with a local SQLite
# file, one local agent, and a sample job. Ctrl-C stops both.
#   DROVER_DEMO_PORT (default 8700), DROVER_DEMO_DIR (default ./drover-demo),
#   DROVER_DEMO_FAKE_GPUS (e.g. 2xA100:81920) to pretend the agent has GPUs,
#   DROVER_DEMO_TAGS (e.g. cuda12,a100) for the agent's tags.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${DROVER_DEMO_PORT:-8700}
DIR=${DROVER_DEMO_DIR:-$PWD/drover-demo}
URL="http://127.0.0.1:$PORT"

command -v curl >/dev/null || { echo "demo: curl is needed (apt-get install curl)" >&2; exit 1; }
echo "==> building (release)"
cargo build --release --quiet -p coordinator -p agent
BIN=$PWD/target/release

mkdir -p "$DIR"
chmod 700 "$DIR"
if [ ! -s "$DIR/registration.secret" ]; then
  (umask 077; od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$DIR/registration.secret")
fi
SECRET=$(cat "$DIR/registration.secret")

pids=()
cleanup() {
  echo
  echo "==> stopping"
  # The agent first, so it can tell the coordinator it is leaving.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

echo "==> starting the coordinator (database $DIR/drover.db, log $DIR/coordinator.log)"
DROVER_REGISTRATION_SECRET=$SECRET "$BIN/drover-coordinator" --db "$DIR/drover.db" \
  --listen "127.0.0.1:$PORT" --auto-approve >>"$DIR/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "demo: the coordinator did not start:" >&2; tail -5 "$DIR/coordinator.log" >&2; exit 1; }
  sleep 0.1
done
ADMIN=$(head -n1 "$DIR/admin.token")

echo "==> starting a local agent (state $DIR/agent, log $DIR/agent.log)"
# Worker names are at most 64 characters.
agent_args=(--coordinator "$URL" --state-dir "$DIR/agent" --name "demo-$(hostname | cut -c1-59)" --slots 2)
[ -n "${DROVER_DEMO_FAKE_GPUS:-}" ] && agent_args+=(--fake-gpus "$DROVER_DEMO_FAKE_GPUS")
[ -n "${DROVER_DEMO_TAGS:-}" ] && agent_args+=(--tags "$DROVER_DEMO_TAGS")
DROVER_REGISTRATION_SECRET=$SECRET "$BIN/drover-agent" "${agent_args[@]}" >>"$DIR/agent.log" 2>&1 &
pids+=($!)

echo "==> submitting a sample job"
JOB=$(curl -fsS -X POST -H "Authorization: Bearer $ADMIN" "$URL/api/v1/jobs" -d '{
  "command": ["sh", "-c", "echo \"hello from job $DROVER_JOB_ID, attempt $DROVER_ATTEMPT, on $(hostname)\"; for i in 1 2 3; do echo \"step $i\"; sleep 0.3; done; echo \"{\\\"answer\\\": 42}\" > \"$DROVER_RESULT_FILE\""],
  "metadata": {"owner": "demo"}}')
ID=$(echo "$JOB" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
echo "    job $ID queued"
for _ in $(seq 300); do
  STATUS=$(curl -fsS -H "Authorization: Bearer $ADMIN" "$URL/api/v1/jobs/$ID" | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p')
  case "$STATUS" in succeeded|failed|cancelled) break ;; esac
  sleep 0.1
done
echo "    job $ID $STATUS; its log:"
curl -fsS -H "Authorization: Bearer $ADMIN" "$URL/api/v1/jobs/$ID/logs" | sed 's/^/      | /'
echo "    its result: $(curl -fsS -H "Authorization: Bearer $ADMIN" "$URL/api/v1/jobs/$ID" | sed -n 's/.*"result":\({[^}]*}\).*/\1/p')"

cat <<MSG

Drover is running.
  Dashboard:  $URL/#token=$ADMIN
  API:        $URL/api/v1   (admin token in $DIR/admin.token)
  Try:
    curl -H "Authorization: Bearer $ADMIN" $URL/api/v1/workers
    curl -H "Authorization: Bearer $ADMIN" -X POST $URL/api/v1/jobs -d '{"command": ["sleep", "5"]}'
    curl -H "Authorization: Bearer $ADMIN" "$URL/api/v1/jobs?status=running"
    sqlite3 $DIR/drover.db 'SELECT id, status, attempt, worker_id FROM jobs'
Press Ctrl-C to stop.
MSG
wait
