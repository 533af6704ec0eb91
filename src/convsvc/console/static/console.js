"use strict";
// The console page: hash routes (#/, #/c/<id>, #/workers, #/audit), live data over
// server-sent events, actions as POSTs carrying the CSRF token. Every value is rendered as
// text (textContent), never as HTML.

const api = "/console/api";
let csrf = "";
let closeCurrent = () => {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function toast(text) {
  const shown = document.getElementById("toast");
  shown.textContent = text;
  shown.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { shown.hidden = true; }, 5000);
}

async function getJson(path) {
  const response = await fetch(api + path, { credentials: "same-origin" });
  if (response.status === 401) { window.location.assign("/console/login"); throw new Error("log in"); }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function act(path, body) {
  const response = await fetch(api + path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || response.statusText);
  return answer;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

// -- conversations, live ---------------------------------------------------------------

const COLUMNS = [
  ["id", "Conversation"], ["user", "User"], ["agent", "Agent"], ["status", "Status"],
  ["agent_state", "Agent state"], ["owner", "Node"], ["worker", "Worker"],
  ["connections", "Connections"], ["queue_position", "Queue"], ["last_active", "Last activity"],
];

function conversationsView(main) {
  const rows = new Map();
  const series = [];
  let lastEvents = null;
  const user = el("input", { id: "filter-user", placeholder: "user" });
  const state = el("select", { id: "filter-state" },
    ...["", "running", "awaiting_user_input", "awaiting_user_confirmation", "paused", "finished",
      "error", "stopped", "loading"].map((s) => el("option", { value: s, text: s || "any state" })));
  const label = el("input", { id: "filter-label", placeholder: "label key=value" });
  const count = el("span", { class: "count", id: "count", text: "0 conversations" });
  const chart = el("canvas", { id: "chart", width: "480", height: "90" });
  const body = el("tbody", { id: "conversation-rows" });
  const table = el("table", { id: "conversations" },
    el("thead", {}, el("tr", {}, ...COLUMNS.map(([, title]) => el("th", { text: title })))), body);
  main.append(
    el("div", { class: "filters" }, user, state, label),
    el("div", { class: "summary-row" }, count, chart,
      el("span", { class: "muted", text: "running (blue) and events/s (grey) on this node, last 5 minutes" })),
    table);

  function shown(c) {
    if (user.value && c.user !== user.value) return false;
    if (state.value && c.agent_state !== state.value) return false;
    if (label.value) {
      const [key, value] = label.value.split("=");
      if ((c.labels || {})[key] !== value) return false;
    }
    return true;
  }

  function render() {
    body.replaceChildren();
    const visible = [...rows.values()].filter(shown)
      .sort((a, b) => (b.last_active || "").localeCompare(a.last_active || ""));
    for (const c of visible) {
      const cells = COLUMNS.map(([key]) => {
        if (key === "id") {
          return el("td", { class: "id" }, el("a", { href: `#/c/${encodeURIComponent(c.id)}`, text: c.id }));
        }
        const value = key === "last_active" ? when(c.last_active)
          : key === "worker" ? workerOf.get(c.id) : c[key];
        return el("td", { text: value === undefined || value === null || value === "" ? "—" : String(value) });
      });
      body.append(el("tr", { "data-id": c.id }, ...cells));
    }
    count.textContent = `${visible.length} conversation${visible.length === 1 ? "" : "s"}`;
  }

  function drawChart() {
    const ctx = chart.getContext("2d");
    ctx.clearRect(0, 0, chart.width, chart.height);
    if (series.length < 2) return;
    const maxRunning = Math.max(1, ...series.map((p) => p.running));
    const maxRate = Math.max(1, ...series.map((p) => p.rate));
    const x = (i) => (i / 149) * chart.width;
    for (const [key, max, colour] of [["running", maxRunning, "#2f5bea"], ["rate", maxRate, "#98a2b3"]]) {
      ctx.strokeStyle = colour;
      ctx.beginPath();
      series.forEach((p, i) => {
        const y = chart.height - 4 - (p[key] / max) * (chart.height - 8);
        if (i === 0) ctx.moveTo(x(i), y); else ctx.lineTo(x(i), y);
      });
      ctx.stroke();
    }
  }

  // Which worker runs each conversation (ListWorkers needs the service token: with a
  // scoped token the column stays empty).
  const workerOf = new Map();
  async function placeWorkers() {
    try {
      const found = await getJson("/workers");
      workerOf.clear();
      for (const w of found.workers) for (const id of w.conversation_ids || []) workerOf.set(id, w.worker_id);
      render();
    } catch (error) { /* not allowed for this token */ }
  }
  placeWorkers();
  const placing = setInterval(placeWorkers, 5000);

  for (const input of [user, state, label]) input.addEventListener("input", render);
  const source = new EventSource(api + "/watch");
  source.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    for (const c of data.items) rows.set(c.id, c);
    render();
  });
  source.addEventListener("change", (e) => {
    const change = JSON.parse(e.data);
    if (change.kind === "CLOSED") rows.delete(change.conversation.id);
    else rows.set(change.conversation.id, change.conversation);
    render();
  });
  source.addEventListener("stats", (e) => {
    const stats = JSON.parse(e.data);
    const rate = lastEvents === null ? 0 : Math.max(0, (stats.events_total - lastEvents) / stats.interval_seconds);
    lastEvents = stats.events_total;
    series.push({ running: stats.running, rate });
    while (series.length > 150) series.shift();
    drawChart();
  });
  source.addEventListener("error", (e) => {
    if (e.data) toast(JSON.parse(e.data).detail);
  });
  return () => { source.close(); clearInterval(placing); };
}

// -- one conversation ------------------------------------------------------------------

function entryOf(event) {
  const kindClass = event.status ? "status"
    : event.name === "agent_state_changed" ? "state" : event.source === "user" ? "user" : "";
  const meta = event.status ? "status update"
    : `#${event.id} · ${when(event.time)} · ${event.source} · ${event.kind} ${event.name}`;
  return el("div", { class: `entry ${kindClass}`, "data-event-id": event.id ?? "" },
    el("div", { class: "meta", text: meta }), el("div", { class: "text", text: event.summary }));
}

function conversationView(main, id) {
  const title = el("h2", { text: id });
  const facts = el("p", { class: "muted", id: "facts" });
  const pending = el("div", { class: "pending", id: "pending", hidden: "" });
  const actions = el("div", { class: "actions" });
  const timeline = el("div", { class: "timeline", id: "timeline" });
  main.append(title, facts, actions, pending, timeline);
  let oldest = null;
  let loading = false;
  let source = null;
  let current = null;

  async function refresh() {
    current = await getJson(`/conversations/${encodeURIComponent(id)}`);
    facts.textContent = `${current.status} · agent ${current.agent} · state ${current.agent_state || "—"} · user ${current.user || "—"} · node ${current.owner || "this one"} · ${current.connections} connection(s)`;
    if (current.pending_action) {
      pending.hidden = false;
      pending.replaceChildren(
        el("strong", { text: `Waiting for approval: ${current.pending_action.action} (#${current.pending_action.event_id})` }),
        el("div", { text: current.pending_action.content }),
        el("div", { class: "actions" },
          button("Approve", "approve", { action_id: current.pending_action.event_id }),
          button("Reject", "reject", { action_id: current.pending_action.event_id }, "danger")));
    } else {
      pending.hidden = true;
    }
  }

  function button(text, action, body, style = "") {
    return el("button", {
      type: "button", class: style, id: `action-${action}`, text,
      onclick: async () => {
        try {
          await act(`/conversations/${encodeURIComponent(id)}/${action}`, body);
          toast(`${text}: done`);
          await refresh();
        } catch (error) {
          toast(`${text}: ${error.message}`);
        }
      },
    });
  }
  actions.append(button("Pause", "pause"), button("Resume", "resume"),
    button("Interrupt", "interrupt"), button("Close", "close", {}, "danger"));

  async function older() {
    if (loading || oldest === 0) return;
    loading = true;
    const before = oldest === null ? "" : `&before=${oldest}`;
    const page = await getJson(`/conversations/${encodeURIComponent(id)}/events?limit=50${before}`);
    const height = timeline.scrollHeight;
    for (const event of page.items) {
      timeline.prepend(entryOf(event));
      oldest = event.id;
    }
    if (page.items.length === 0) oldest = 0;
    timeline.scrollTop += timeline.scrollHeight - height;
    loading = false;
    return page.items;
  }

  timeline.addEventListener("scroll", () => { if (timeline.scrollTop < 40) older(); });
  (async () => {
    try {
      await refresh();
      const first = await older();
      timeline.scrollTop = timeline.scrollHeight;
      const from = first && first.length ? first[0].id + 1 : 0;
      source = new EventSource(`${api}/conversations/${encodeURIComponent(id)}/stream?from=${from}`);
      source.addEventListener("event", (e) => {
        const atBottom = timeline.scrollTop + timeline.clientHeight >= timeline.scrollHeight - 40;
        const event = JSON.parse(e.data);
        timeline.append(entryOf(event));
        if (atBottom) timeline.scrollTop = timeline.scrollHeight;
        if (event.name === "agent_state_changed") refresh();
      });
      source.addEventListener("status", (e) => timeline.append(entryOf(JSON.parse(e.data))));
      source.addEventListener("error", (e) => { if (e.data) toast(JSON.parse(e.data).detail); });
    } catch (error) {
      facts.textContent = error.message;
      facts.className = "error";
    }
  })();
  return () => { if (source) source.close(); };
}

// -- workers and nodes, audit ------------------------------------------------------------

function workersView(main) {
  const body = el("tbody", { id: "worker-rows" });
  const nodes = el("tbody", { id: "node-rows" });
  main.append(
    el("h2", { text: "Agent workers" }),
    el("table", { id: "workers" }, el("thead", {}, el("tr", {},
      ...["Worker", "Kinds", "Capacity", "Load", "Conversations", "Node"].map((t) => el("th", { text: t })))), body),
    el("h2", { text: "Cluster nodes" }),
    el("table", { id: "nodes" }, el("thead", {}, el("tr", {},
      ...["Node", "Address", "Conversations (leases)", "Leases until", "Agent kinds", "Last heartbeat"].map((t) => el("th", { text: t })))), nodes));
  (async () => {
    try {
      const found = await getJson("/workers");
      for (const w of found.workers) {
        body.append(el("tr", {}, ...[w.worker_id, (w.kinds || []).join(", "), w.capacity, w.load,
          (w.conversation_ids || []).join(", ") || "—", w.node_address || "this node"].map((v) => el("td", { text: String(v) }))));
      }
      if (!found.workers.length) body.append(el("tr", {}, el("td", { text: "no worker attached", colspan: "6" })));
      for (const n of found.nodes) {
        nodes.append(el("tr", {}, ...[n.node_id, n.address, n.conversations, when(n.lease_expire_time),
          (n.agent_kinds || []).join(", ") || "—", when(n.heartbeat_time)].map((v) => el("td", { text: String(v) }))));
      }
      if (!found.nodes.length) nodes.append(el("tr", {}, el("td", { text: "not clustered (embedded SQLite)", colspan: "6" })));
    } catch (error) {
      body.append(el("tr", {}, el("td", { class: "error", text: error.message, colspan: "6" })));
    }
  })();
  return () => {};
}

function auditView(main) {
  const conversation = el("input", { id: "audit-conversation", placeholder: "conversation id" });
  const user = el("input", { id: "audit-user", placeholder: "user id" });
  const body = el("tbody", { id: "audit-rows" });
  const more = el("button", { type: "button", id: "audit-more", text: "Older entries", hidden: "" });
  let token = "";
  const columns = ["sequence", "time", "method", "code", "reason", "credential", "subject", "user_id", "conversation_id"];
  main.append(
    el("div", { class: "filters" }, conversation, user,
      el("button", { type: "button", id: "audit-search", text: "Search", onclick: () => load(true) })),
    el("table", { id: "audit" }, el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { text: c })))), body),
    more);
  async function load(fresh) {
    if (fresh) { token = ""; body.replaceChildren(); }
    const query = new URLSearchParams({ conversation_id: conversation.value, user_id: user.value, page_token: token });
    try {
      const page = await getJson(`/audit?${query}`);
      for (const entry of page.items) {
        body.append(el("tr", {}, ...columns.map((c) => el("td", { text: c === "time" ? when(entry.time) : String(entry[c] ?? "") }))));
      }
      token = page.next_page_token;
      more.hidden = !token;
    } catch (error) {
      body.append(el("tr", {}, el("td", { class: "error", text: error.message, colspan: String(columns.length) })));
    }
  }
  more.addEventListener("click", () => load(false));
  load(true);
  return () => {};
}

// -- routing -----------------------------------------------------------------------------

function route() {
  closeCurrent();
  const main = document.getElementById("main");
  main.replaceChildren();
  const hash = window.location.hash || "#/";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", hash === link.getAttribute("href"));
  }
  if (hash.startsWith("#/c/")) closeCurrent = conversationView(main, decodeURIComponent(hash.slice(4)));
  else if (hash === "#/workers") closeCurrent = workersView(main);
  else if (hash === "#/audit") closeCurrent = auditView(main);
  else closeCurrent = conversationsView(main);
}

document.getElementById("logout").addEventListener("click", async () => {
  try {
    await fetch("/console/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
  } finally {
    window.location.assign("/console/login");
  }
});

(async () => {
  const session = await getJson("/session");
  csrf = session.csrf;
  window.addEventListener("hashchange", route);
  route();
})();
