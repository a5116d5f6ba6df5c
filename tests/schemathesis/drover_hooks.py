"""Schemathesis hooks for the Drover coordinator run (scripts/schemathesis.sh).

- Every request carries a bearer token chosen by route, set just before it
  is sent: the admin token; an agent's token (a worker the script
  pre-registered) on agent routes; the registration secret on register.
  With the admin token alone the agent routes would only ever answer 401.
  That worker is never decommissioned, rejected or deleted by the run.
- Long-polls would make each generated request wait up to 30 s: `wait` is
  capped at 1 s (and set where absent: a claim's default is 30 s) and `follow` (a log streamed until its attempt ends) is
  dropped. Everything else is sent as generated.
"""
import os

import schemathesis

AGENT_ROUTES = {
    ("POST", "/api/v1/agents/heartbeat"),
    ("POST", "/api/v1/agents/claim"),
    ("POST", "/api/v1/jobs/{id}/complete"),
    ("POST", "/api/v1/jobs/{id}/logs"),
    ("POST", "/api/v1/agents/telemetry"),
}

LONG_POLLS = {"/api/v1/agents/claim", "/api/v1/events"}


def _token(method, path):
    if path == "/api/v1/agents/register":
        return os.environ["DROVER_ST_SECRET"]
    if (method.upper(), path) in AGENT_ROUTES:
        return os.environ["DROVER_ST_AGENT_TOKEN"]
    return os.environ["DROVER_ST_ADMIN"]


@schemathesis.hook
def before_call(ctx, case, kwargs):
    op = case.operation
    case.headers = dict(case.headers or {})
    case.headers["Authorization"] = "Bearer " + _token(op.method, op.path)
    # The run's own agent must keep its token: generated ids that would
    # decommission or reject it point elsewhere.
    forgets = op.method.upper() == "DELETE" and op.path == "/api/v1/workers/{id}"
    if (forgets or op.path.endswith(("/decommission", "/reject"))) and isinstance(case.path_parameters, dict):
        if str(case.path_parameters.get("id")) == os.environ["DROVER_ST_AGENT_ID"]:
            case.path_parameters["id"] = 1_000_000
    query = dict(case.query or {})
    wait = query.get("wait")
    if op.path in LONG_POLLS and (wait is None or (type(wait) is int and wait > 1)):
        query["wait"] = 1
    query.pop("follow", None)
    case.query = query
