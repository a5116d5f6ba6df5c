// Drover dashboard: reads the coordinator's API with the admin token or a
// named API token; shows only the actions its role allows (/whoami).
// Everything shown comes from users and agents: it is put in the page as
// text (never as HTML).
"use strict";

const KEY = "drover-admin-token";
let token = null;
let selected = null;
let statusFilter = "";
let lastEventId = null;
// The token's role: read, submit or admin (null until asked).
let role = null;
const may = (need) => ["read", "submit", "admin"].indexOf(role) >= ["read", "submit", "admin"].indexOf(need);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, path) {
  const resp = await fetch(path, { method, headers: { Authorization: "Bearer " + token } });
  if (resp.status === 401) { logout("The token was refused."); throw new Error("unauthorized"); }
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  if (!resp.ok) throw new Error((body && body.error && body.error.message) || resp.statusText);
  return body;
}

function ago(iso) {
  if (!iso) return "—";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  if (s < 86400) return Math.round(s / 3600) + "h ago";
  return new Date(iso).toLocaleString();
}

function stat(value, label) { return h("div", { class: "stat" }, h("b", {}, value), h("span", {}, label)); }

function renderSummary(s) {
  const w = s.workers, j = s.jobs;
  const live = w.idle + w.busy + w.draining;
  document.getElementById("summary").replaceChildren(
    stat(live, "workers online"), stat(w.pending, "pending"), stat(w.offline, "offline"),
    stat(`${s.gpus.busy}/${s.gpus.total}`, "GPUs busy"),
    stat(j.queued, "queued"), stat(j.running, "running"), stat(j.succeeded, "succeeded"), stat(j.failed, "failed"));
}

function renderWorkers(workers) {
  document.getElementById("worker-count").textContent = `(${workers.length})`;
  const cards = workers.map((w) => {
    const metrics = new Map((w.gpu_metrics || []).map((m) => [m.index, m]));
    const gpus = (w.gpus || []).map((g) => {
      const m = metrics.get(g.index) || {};
      const util = Math.round(m.utilization_pct || 0);
      return h("div", { class: "gpu", title: `${g.model} ${g.uuid}` },
        h("span", {}, `#${g.index} ${g.model}`),
        h("div", { class: "bar" }, h("i", { style: `width:${util}%` })),
        h("span", { class: "muted" }, `${util}% ${Math.round(g.vram_mb / 1024)}G`));
    });
    const actions = [];
    if (!may("admin")) return workerCard(w, gpus, actions);
    const post = (what, label, cls) => h("button", { class: cls || "", "data-action": what,
      onclick: (e) => { e.stopPropagation(); act("POST", `/api/v1/workers/${w.id}/${what}`); } }, label);
    if (w.state === "pending") actions.push(post("approve", "Approve"), post("reject", "Reject", "ghost"));
    if (w.state === "idle" || w.state === "busy") actions.push(post("drain", "Drain", "ghost"));
    if (w.state === "draining") actions.push(post("undrain", "Undrain"));
    if (w.state !== "pending" && w.state !== "decommissioned") {
      actions.push(h("button", { class: "ghost", onclick: (e) => { e.stopPropagation(); editTags(w); } }, "Tags"));
      actions.push(post("decommission", "Decommission", "ghost danger-text"));
    }
    if (w.state === "offline" || w.state === "stopped" || w.state === "decommissioned") {
      actions.push(h("button", { class: "ghost danger-text", "data-action": "delete",
        onclick: (e) => { e.stopPropagation(); act("DELETE", `/api/v1/workers/${w.id}`); } }, "Delete"));
    }
    return workerCard(w, gpus, actions);
  });
  document.getElementById("workers").replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "No workers yet. Start drover-agent on a machine.")]));
}

function workerCard(w, gpus, actions) {
  return h("div", { class: `card worker ${w.state}`, "data-worker": w.id, onclick: () => { selected = { worker: w.id }; refresh(); } },
    h("div", { class: "top" }, h("span", { class: "name", title: w.name }, w.name), h("span", { class: `pill ${w.state}` }, w.state)),
    h("div", { class: "meta" }, `#${w.id} · ${w.hostname} · ${w.cpu_cores} cores · ${Math.round(w.memory_mb / 1024)} GiB · ${w.running_jobs}/${w.slots} slots · seen ${ago(w.last_seen_at)}`),
    w.tags.length ? h("div", { class: "tags" }, w.tags.map((t) => h("span", { class: "tag" }, t))) : null,
    gpus.length ? gpus : h("div", { class: "muted" }, "CPU worker"),
    w.restore ? h("div", { class: "restore", title: "run this where you keep your SSH keys" }, "Bring it back: ", h("code", {}, w.restore)) : null,
    actions.length ? h("div", { class: "actions" }, actions) : null);
}

function editTags(w) {
  const value = prompt(`Tags of ${w.name} (comma separated; replaces the agent's --tags):`, w.tags.join(","));
  if (value === null) return;
  const tags = value.split(",").map((t) => t.trim()).filter((t) => t);
  fetch(`/api/v1/workers/${w.id}/tags`, {
    method: "PUT", headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: JSON.stringify({ tags }),
  }).then(async (r) => { if (!r.ok) alert((await r.json()).error.message); refresh(); });
}

function renderJobs(jobs) {
  const rows = jobs.map((j) => h("tr", { class: selected && selected.job === j.id ? "sel" : "", onclick: () => { selected = { job: j.id }; refresh(); } },
    h("td", {}, j.id), h("td", {}, h("span", { class: `pill ${j.status}` }, j.status)),
    h("td", { class: "cmd", title: j.command.join(" ") }, j.command.join(" ")),
    h("td", {}, `${j.attempt}/${j.max_attempts}`), h("td", {}, j.worker_id ?? "—"),
    h("td", {}, j.gpus || "—"), h("td", { class: "muted" }, ago(j.created_at))));
  document.querySelector("#jobs tbody").replaceChildren(...rows);
}

async function renderWorker(id) {
  const box = document.getElementById("detail");
  const w = await api("GET", `/api/v1/workers/${id}`);
  const rows = (list, cols) => h("table", {}, h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c[0])))),
    h("tbody", {}, list.map((r) => h("tr", {}, cols.map((c) => h("td", {}, c[1](r)))))));
  const util = new Map();
  for (const s of w.gpu_history || []) {
    const u = util.get(s.gpu) || [];
    u.push(s.utilization_pct);
    util.set(s.gpu, u);
  }
  box.replaceChildren(
    h("h3", {}, `Worker ${w.name} `, h("span", { class: `pill ${w.state}` }, w.state)),
    h("div", { class: "kv" },
      h("div", {}, "host"), h("div", {}, `${w.hostname} · ${w.cpu_cores} cores · ${Math.round(w.memory_mb / 1024)} GiB`),
      h("div", {}, "agent"), h("div", {}, w.agent_version || "—"),
      h("div", {}, "tags"), h("div", {}, w.tags.join(", ") + (w.tags_pinned ? " (set by admin)" : "")),
      h("div", {}, "GPU util, 1 h"), h("div", {}, [...util.entries()].map(([g, u]) =>
        `#${g}: avg ${Math.round(u.reduce((a, b) => a + b, 0) / u.length)}%, max ${Math.round(Math.max(...u))}%`).join(" · ") || "—")),
    h("h3", {}, "Health log"),
    rows(w.health_log.slice(0, 20), [["when", (r) => ago(r.at)], ["from", (r) => r.from || "—"], ["to", (r) => r.to], ["why", (r) => r.reason]]),
    h("h3", {}, "Recent jobs"),
    rows(w.recent_jobs.slice(0, 20), [["job", (r) => r.job_id], ["attempt", (r) => r.attempt], ["outcome", (r) => r.outcome || "running"], ["started", (r) => ago(r.started_at)]]),
    h("h3", {}, "Agent log (live)"),
    h("pre", { class: "log", id: "agent-log" }, agentLogText()));
  followAgentLog(id);
}

// The selected worker's agent log, followed live (SSE through fetch).
let agentLog = { worker: null, lines: [], abort: null };

function agentLogText() {
  return agentLog.lines.map((l) => `${l.time} ${l.level.toUpperCase()} ${l.target}: ${l.message}`).join("\n") || "(nothing yet)";
}

function followAgentLog(id) {
  if (agentLog.worker === id) return;
  if (agentLog.abort) agentLog.abort.abort();
  agentLog = { worker: id, lines: [], abort: new AbortController() };
  const mine = agentLog;
  (async () => {
    let last = 0;
    while (agentLog === mine) {
      try {
        await readSse(`/api/v1/workers/${id}/logs?follow=1&after=${last}`, mine.abort.signal, (frame) => {
          const data = frame.match(/^data: (.*)$/m);
          if (!data) return;
          const line = JSON.parse(data[1]);
          last = line.id;
          mine.lines.push(line);
          if (mine.lines.length > 500) mine.lines.shift();
          const el = document.getElementById("agent-log");
          if (el && agentLog === mine) el.textContent = agentLogText();
        });
      } catch (_) { /* aborted, or reconnect below */ }
      await new Promise((r) => setTimeout(r, 2000));
    }
  })();
}

async function renderDetail() {
  const box = document.getElementById("detail");
  if (selected === null) return;
  if (selected.worker) return renderWorker(selected.worker);
  if (agentLog.abort) { agentLog.abort.abort(); agentLog = { worker: null, lines: [], abort: null }; }
  const id = selected.job;
  const j = await api("GET", `/api/v1/jobs/${id}`);
  let log = "";
  try { log = await api("GET", `/api/v1/jobs/${id}/logs`); } catch (_) { log = ""; }
  const kv = (k, v) => [h("div", {}, k), h("div", {}, v ?? "—")];
  const actions = [];
  // A read token changes nothing (a submit token only its own jobs: the
  // coordinator says so if not).
  if (may("submit") && (j.status === "queued" || j.status === "running")) {
    actions.push(h("button", { class: "danger", disabled: j.cancel_requested, onclick: () => act("POST", `/api/v1/jobs/${j.id}/cancel`) },
      j.cancel_requested ? "Cancelling…" : "Cancel"));
  }
  if (may("submit") && (j.status === "failed" || j.status === "cancelled")) {
    actions.push(h("button", { onclick: () => act("POST", `/api/v1/jobs/${j.id}/retry`) }, "Retry"));
  }
  const progress = j.progress && typeof j.progress.progress === "number" ? Math.max(0, Math.min(1, j.progress.progress)) : null;
  box.replaceChildren(
    h("h3", {}, `Job ${j.id} `, h("span", { class: `pill ${j.status}` }, j.status)),
    h("div", { class: "kv" },
      kv("command", h("code", {}, j.command.join(" "))), kv("attempt", `${j.attempt} (${j.attempts_used}/${j.max_attempts} used)`),
      kv("worker", j.worker_id), kv("GPUs", j.gpus ? `${j.gpus} → [${j.gpu_indices.join(", ")}]` : "none"),
      j.waiting_reason ? kv("waiting", j.waiting_reason) : null,
      progress !== null ? kv("progress", h("div", { class: "bar wide" }, h("i", { style: `width:${Math.round(progress * 100)}%` }))) : null,
      j.progress ? kv("progress doc", h("code", {}, JSON.stringify(j.progress))) : null,
      kv("priority", j.priority), kv("exit code", j.exit_code), kv("error", j.error),
      kv("result", j.result ? h("code", {}, JSON.stringify(j.result)) : null),
      kv("created", ago(j.created_at)), kv("finished", ago(j.finished_at)),
      j.run_after ? kv("waits until", new Date(j.run_after).toLocaleString()) : null),
    actions.length ? h("div", { class: "actions" }, actions) : null,
    h("h3", {}, "Attempts"),
    h("table", {}, h("thead", {}, h("tr", {}, ["#", "worker", "outcome", "exit", "started"].map((t) => h("th", {}, t)))),
      h("tbody", {}, j.attempts.map((a) => h("tr", {}, h("td", {}, a.attempt), h("td", {}, a.worker_id),
        h("td", {}, a.outcome || "running"), h("td", {}, a.exit_code ?? "—"), h("td", { class: "muted" }, ago(a.started_at)))))),
    h("h3", {}, `Log (attempt ${j.attempt})`),
    h("pre", { class: "log" }, typeof log === "string" && log.length ? log : "(no output)"));
}

async function act(method, path) {
  try { await api(method, path); } catch (e) { alert(e.message); }
  refresh();
}

async function refresh() {
  if (!token) return;
  try {
    if (role === null) role = (await api("GET", "/api/v1/whoami")).role;
    document.getElementById("role").textContent = role === "admin" ? "" : `signed in with a ${role} token`;
    const q = statusFilter ? `?status=${statusFilter}&limit=100` : "?limit=100";
    const [stats, workers, jobs] = await Promise.all([
      api("GET", "/api/v1/stats"), api("GET", "/api/v1/workers"), api("GET", "/api/v1/jobs" + q)]);
    renderSummary(stats);
    if (lastEventId === null) lastEventId = stats.last_event_id;
    renderWorkers(workers.workers);
    renderJobs(jobs.jobs);
    await renderDetail();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "error: " + e.message;
  }
}

function show(loggedIn) {
  document.getElementById("login").hidden = loggedIn;
  document.getElementById("app").hidden = !loggedIn;
  document.getElementById("logout").hidden = !loggedIn;
}

function logout(message) {
  token = null;
  role = null;
  sessionStorage.removeItem(KEY);
  document.getElementById("login-error").textContent = message || "";
  show(false);
}

function start() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem(KEY);
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = document.getElementById("token").value.trim();
    sessionStorage.setItem(KEY, token);
    show(true);
    refresh();
  });
  document.getElementById("logout").addEventListener("click", () => logout());
  document.getElementById("status-filter").addEventListener("change", (e) => { statusFilter = e.target.value; refresh(); });
  show(!!token);
  refresh();
  // Live: refresh on every event (coalesced); a slow poll for heartbeat
  // metrics, which are not events.
  follow();
  setInterval(refresh, 5000);
}

let pending = null;
function soon() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh(); }, 250);
}

// Server-sent events through fetch (EventSource cannot send the token):
// calls onFrame with each frame's text until the stream ends.
async function readSse(url, signal, onFrame) {
  const resp = await fetch(url, { headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" }, signal });
  if (!resp.ok) throw new Error(resp.statusText);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      onFrame(buf.slice(0, i));
      buf = buf.slice(i + 2);
    }
  }
}

// The event stream: a refresh (coalesced) on every event.
async function follow() {
  let last = null;
  for (;;) {
    if (!token || lastEventId === null) { await new Promise((r) => setTimeout(r, 500)); continue; }
    if (last === null) last = lastEventId;
    try {
      await readSse("/api/v1/events?after=" + last, undefined, (frame) => {
        const id = frame.match(/^id: (\d+)/m);
        if (id) { last = Number(id[1]); soon(); }
      });
    } catch (_) { /* reconnect below */ }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

document.addEventListener("DOMContentLoaded", start);
