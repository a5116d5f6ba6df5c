#!/usr/bin/env bash
# Property-based API testing with schemathesis (PyPI) against a live
# coordinator: every documented operation gets generated requests, valid and
# invalid; no response may be a 5xx, every response must match
# /api/v1/openapi.json (status code, content type, headers, body schema),
# and a request the document calls invalid must be refused (4xx).
#
#   scripts/schemathesis.sh [COORDINATOR_BINARY] [MAX_EXAMPLES]
#
# Defaults: target/debug/drover-coordinator (build it first), 100 examples
# per operation. Needs python3; schemathesis goes into target/schemathesis-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-target}/debug/drover-coordinator}
examples=${2:-100}
[ -x "$bin" ] || { echo "no coordinator binary at $bin: run cargo build first" >&2; exit 2; }

venv=${CARGO_TARGET_DIR:-target}/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'schemathesis==4.32.5'
fi

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
admin=st-admin-token-$RANDOM$RANDOM
"$bin" --db "$work/drover.db" --listen "127.0.0.1:$port" --admin-token "$admin" \
  --registration-secret st-secret --auto-approve >"$work/coordinator.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

# Agent routes run with a pre-registered worker's token (see the hooks).
worker=$(curl -sf -X POST -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/api/v1/workers" \
  -d '{"name": "schemathesis"}')
agent_token=$(echo "$worker" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
agent_id=$(echo "$worker" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')

status=0
DROVER_ST_ADMIN=$admin DROVER_ST_SECRET=st-secret DROVER_ST_AGENT_TOKEN=$agent_token DROVER_ST_AGENT_ID=$agent_id PYTHONPATH=tests/schemathesis SCHEMATHESIS_HOOKS=drover_hooks "$venv/bin/st" run \
  "http://127.0.0.1:$port/api/v1/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
  --max-examples "$examples" --seed 1 --request-timeout 10 --workers 1 \
  --suppress-health-check all --no-color || status=$?

# A 5xx would also be in the coordinator's log as an error line.
if grep -E ' ERROR ' "$work/coordinator.log"; then
  echo "the coordinator logged errors during the run" >&2
  status=1
fi
kill -0 $pid 2>/dev/null || { echo "the coordinator died during the run" >&2; status=1; }
exit $status
