// The operator console: sign in, pick an edge, send commands checked against its
// capabilities, follow every command's lifecycle, read the audit history.
// Text reaches the page only through textContent (no HTML from data).
import {
  DispatchClient, GatewayError, FINAL, answered, closeCodeWords, isSuperseded, newCommandId,
  checkChannelValue, isLargeChange, parseWhole, unitChoices, formatIn,
} from "./client/index.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "dispatch.token";
const SENT_KEY = "dispatch.sent";
const EDGE_POLL_MS = 2000;
const HISTORY_ROWS = 50;
const STATUSES = ["issued", "authorized", "queued", "routed", "delivered", "executed", "failed",
  "rejected", "timed_out", "expired", "cancelled", "lost"];

const state = {
  client: null,
  me: null,
  edges: new Map(),      // edge_id -> summary from /api/edges
  configs: new Map(),    // edge_id -> capability config
  rows: new Map(),       // command_id -> row model
  scope: "mine",
  inFlight: null,        // command id whose answer Send waits for
  timers: [],
};

// ---------------------------------------------------------------- small DOM helpers
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** Replace a container's children without losing the keyboard focus inside it. */
function replaceKeepingFocus(container, children) {
  const key = document.activeElement?.dataset?.focusKey;
  container.replaceChildren(...children);
  if (key) container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`)?.focus();
}

function announce(text) {
  const region = $("announce");
  region.textContent = "";
  // A fresh text node makes screen readers read it even when it repeats.
  setTimeout(() => { region.textContent = text; }, 30);
}

function age(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

function clock(iso) {
  return iso ? iso.replace("T", " ").replace("Z", "") : "";
}

function showValue(value, unit) {
  if (typeof value !== "number") return String(value ?? "");
  if (unit === "W" && Math.abs(value) >= 1000) return `${value / 1000} kW (${value} W)`;
  return `${value}${unit ? " " + unit : ""}`;
}

// ---------------------------------------------------------------- sign-in
function showSignIn(message) {
  $("signin").hidden = false;
  $("workspace").hidden = true;
  $("who").hidden = true;
  $("token-error").textContent = message || "";
  $("token").setAttribute("aria-invalid", message ? "true" : "false");
  $("token").value = "";
  $("token").focus();
}

async function signIn(token) {
  const client = new DispatchClient({ baseUrl: location.origin, token });
  let me;
  try {
    me = await client.rest.me();
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    const why = err instanceof GatewayError && err.status === 401
      ? `The gateway refused this token: ${err.message}`
      : `The gateway could not be reached (${err.message}). Try again.`;
    showSignIn(why);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.client = client;
  state.me = me;
  $("signin").hidden = true;
  $("workspace").hidden = false;
  $("who").hidden = false;
  $("who-user").textContent = me.user_id;
  tickExpiry();
  client.onConnection(showConnection);
  client.onStatus(onStatus);
  client.connect().catch(() => {}); // retries by itself; the header says how it goes
  await loadEdges();
  await loadRecent();
  resumeMine();
  state.timers.push(setInterval(loadEdges, EDGE_POLL_MS));
  state.timers.push(setInterval(tick, 1000));
  $("main").focus();
}

function signOut(message) {
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
  state.client?.close();
  state.client = null;
  state.rows.clear();
  $("commands").tBodies[0].replaceChildren();
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(SENT_KEY);
  showSignIn(message);
}

function tickExpiry() {
  if (!state.me) return;
  const left = Math.round((Date.parse(state.me.expires_at) - Date.now()) / 1000);
  $("who-expiry").textContent = left > 0
    ? `token expires in ${left >= 3600 ? `${Math.floor(left / 3600)} h ${Math.floor((left % 3600) / 60)} min` : left >= 60 ? `${Math.floor(left / 60)} min` : `${left} s`}`
    : "token expired";
}

function showConnection(event) {
  setTimeout(validate, 0); // Send follows the connection
  const conn = $("conn");
  conn.dataset.state = event.state;
  if (event.state === "open") {
    conn.textContent = "Connected";
    // A command sent just before the drop may never be answered on this socket: its row
    // shows what the ledger says after the re-sync; Send is free again.
    state.inFlight = null;
    if (state.wasDown) { state.wasDown = false; loadRecent(); }
  } else if (event.state === "connecting") {
    conn.textContent = "Connecting…";
  } else if (event.state === "reconnecting") {
    state.wasDown = true;
    const wait = event.retryInMs ? ` Retrying in ${Math.max(1, Math.round(event.retryInMs / 1000))} s.` : "";
    conn.textContent = `Offline: ${event.words ?? "connection lost"}.${wait}`;
  } else {
    conn.textContent = event.words ? `Disconnected: ${event.words}` : "Disconnected";
    if (event.code === 4003) signOut(`Signed out: ${closeCodeWords(4003)}.`);
  }
}

// ---------------------------------------------------------------- edges and capabilities
async function loadEdges() {
  if (!state.client) return;
  let edges;
  try {
    edges = await state.client.rest.edges();
  } catch {
    return; // the connection badge already says the gateway is unreachable
  }
  const first = state.edges.size === 0;
  state.edges = new Map(edges.map((e) => [e.edge_id, e]));
  for (const edge of edges) {
    if (!state.configs.has(edge.edge_id)) {
      try {
        state.configs.set(edge.edge_id, await state.client.rest.capabilities(edge.edge_id));
      } catch {
        state.configs.set(edge.edge_id, null);
      }
    }
  }
  renderEdges();
  if (first) fillEdgePicker();
}

function renderEdges() {
  const list = $("edges");
  const items = [];
  for (const edge of state.edges.values()) {
    const config = state.configs.get(edge.edge_id);
    const details = el("details", {}, el("summary", { text: "Devices and controllers", "data-focus-key": `edge:${edge.edge_id}` }));
    if (config) {
      const ul = el("ul");
      for (const device of config.devices) {
        for (const ch of device.channels) {
          const limits = ch.min != null || ch.max != null ? `, ${ch.min ?? "…"} to ${ch.max ?? "…"} ${ch.unit}` : "";
          ul.append(el("li", { text: `${device.device_id} / ${ch.name} (${ch.access === "read" ? "read only" : "writable"}${limits})` }));
        }
      }
      for (const c of config.controllers) ul.append(el("li", { text: `controller ${c.name}: ${c.modes.join(", ")}` }));
      details.append(ul);
    } else {
      details.append(el("p", { class: "help", text: "No capability config is known for this edge." }));
    }
    items.push(el("li", { "data-edge": edge.edge_id, "data-online": String(edge.online) },
      el("div", { class: "edge-head" },
        el("strong", { text: edge.edge_id }),
        el("span", { class: edge.online ? "badge online" : "badge", text: edge.online ? "online" : "offline" })),
      el("p", { class: "edge-meta", text:
        `${edge.online ? `last seen ${age(edge.last_seen)} ago` : "not connected"} · ` +
        `queue ${edge.queue_depth ?? "?"} · ${edge.can_control ? "you may control it" : "view only"}` }),
      details));
  }
  // Keep open <details> open across refreshes.
  const open = new Set([...list.querySelectorAll("li[data-edge]")]
    .filter((li) => li.querySelector("details")?.open).map((li) => li.dataset.edge));
  for (const li of items) if (open.has(li.dataset.edge)) li.querySelector("details").open = true;
  replaceKeepingFocus(list, items);
  $("edges-empty").hidden = items.length > 0;
  updateFormAccess();
}

function fillEdgePicker() {
  const picker = $("f-edge");
  picker.replaceChildren(...[...state.edges.keys()].map((id) => el("option", { value: id, text: id })));
  onEdgeChange();
}

function currentConfig() {
  return state.configs.get($("f-edge").value) ?? null;
}

function writableChannels(config) {
  const out = [];
  for (const device of config?.devices ?? []) {
    for (const ch of device.channels) {
      if (ch.access !== "read") out.push({ device: device.device_id, channel: ch });
    }
  }
  return out;
}

function onEdgeChange() {
  const config = currentConfig();
  $("f-channel").replaceChildren(...writableChannels(config).map(({ device, channel }) =>
    el("option", { value: `${device}/${channel.name}`, text: `${device} / ${channel.name}` })));
  $("f-controller").replaceChildren(...(config?.controllers ?? []).map((c) =>
    el("option", { value: c.name, text: c.name.replace(/_/g, " ") })));
  onChannelChange();
  onControllerChange();
  updateFormAccess();
}

function selectedChannel() {
  const [device, name] = $("f-channel").value.split("/");
  const found = writableChannels(currentConfig()).find((c) => c.device === device && c.channel.name === name);
  return found ?? null;
}

function onChannelChange() {
  const picked = selectedChannel();
  const unit = $("f-unit");
  const choices = picked ? unitChoices(picked.channel.unit) : [];
  unit.replaceChildren(...choices.map((c) => el("option", { value: c.unit, text: c.unit })));
  describeLimits();
  validate();
}

function describeLimits() {
  const picked = selectedChannel();
  if (!picked) { $("f-channel-limits").textContent = "This edge has no writable channel."; return; }
  const ch = picked.channel;
  const choice = unitChoices(ch.unit).find((c) => c.unit === $("f-unit").value) ?? { unit: ch.unit, factor: 1 };
  const lo = ch.min != null ? formatIn(ch.min, choice.unit, choice.factor) : "no lower limit";
  const hi = ch.max != null ? formatIn(ch.max, choice.unit, choice.factor) : "no upper limit";
  const sign = ch.unit === "W" || ch.unit === "kW"
    ? " Positive charges the battery, negative discharges it." : "";
  $("f-channel-limits").textContent = `Limits: ${lo} to ${hi}.${sign}`;
}

function onControllerChange() {
  const config = currentConfig();
  const controller = config?.controllers.find((c) => c.name === $("f-controller").value);
  $("f-mode").replaceChildren(...(controller?.modes ?? []).map((m) => el("option", { value: m, text: m })));
  validate();
}

function onTypeChange() {
  const type = $("f-type").value;
  for (const field of document.querySelectorAll("[data-for]")) {
    field.hidden = !field.dataset.for.split(" ").includes(type);
  }
  validate();
}

function updateFormAccess() {
  const edge = state.edges.get($("f-edge").value);
  const readOnly = edge !== undefined && !edge.can_control;
  $("send-readonly").hidden = !readOnly;
  $("send-fields").disabled = readOnly || edge === undefined;
  validate();
}

// ---------------------------------------------------------------- the command form
function setError(inputId, message) {
  const input = $(inputId);
  const out = $(`${inputId}-error`);
  const shown = input.dataset.touched === "true" ? message : "";
  out.textContent = shown;
  input.setAttribute("aria-invalid", shown ? "true" : "false");
}

/** The command the form describes, or null (each bad field says why next to it). */
function validate() {
  const type = $("f-type").value;
  let ok = true;
  const problems = {};
  const picked = selectedChannel();
  let value = null;
  if (type === "setpoint" || type === "config_override") {
    if (!picked) ok = false;
    else {
      const checked = checkChannelValue($("f-value").value, picked.channel, $("f-unit").value);
      if (checked.ok) value = checked.value; else { ok = false; problems["f-value"] = checked.message; }
    }
  }
  let duration = null;
  if (type === "config_override") {
    const checked = parseWhole($("f-duration").value, 1, 10080, "duration in minutes");
    if (checked.ok) duration = checked.value * 60; else { ok = false; problems["f-duration"] = checked.message; }
  }
  const expiry = parseWhole($("f-expiry").value, 1, 604800, "time limit in seconds");
  if (!expiry.ok) { ok = false; problems["f-expiry"] = expiry.message; }
  for (const id of ["f-value", "f-duration", "f-expiry"]) setError(id, problems[id] ?? "");
  const edge = state.edges.get($("f-edge").value);
  const connected = state.client?.state === "open";
  const busy = state.inFlight !== null;
  $("send").disabled = !ok || !edge?.can_control || !connected || busy;
  $("send-status").textContent = busy ? "Waiting for the gateway's answer…"
    : !connected && state.client ? "Send is available once connected." : "";
  if (!ok || !edge) return null;
  const target = { edge_id: edge.edge_id, device_id: "core", channel: "system" };
  let body;
  if (type === "setpoint" || type === "config_override") {
    target.device_id = picked.device;
    target.channel = picked.channel.name;
    body = { value, unit: picked.channel.unit || null };
  } else if (type === "mode_change") {
    if (!$("f-controller").value || !$("f-mode").value) return null;
    target.channel = $("f-controller").value;
    body = { value: $("f-mode").value };
  } else if (type === "scheduler_control") {
    if (!$("f-controller").value) return null;
    target.channel = $("f-controller").value;
    body = { value: $("f-action").value };
  } else {
    body = { value: $("f-system").value };
  }
  const command = {
    command_id: newCommandId(),
    command_type: type,
    target,
    ...body,
    expiry_sec: expiry.value,
    source: state.me.user_id,
    timestamp: new Date().toISOString(),
    priority: $("f-emergency").checked ? "emergency" : "normal",
  };
  if (duration !== null) command.duration_sec = duration;
  return { command, channel: picked?.channel };
}

function confirmation(command, channel) {
  const reasons = [];
  if (command.priority === "emergency") reasons.push("It goes out with EMERGENCY priority and is applied at once.");
  if (command.command_type === "system" && command.value === "restart") reasons.push(`It restarts the edge ${command.target.edge_id}.`);
  if (channel && typeof command.value === "number" && isLargeChange(command.value, channel)) {
    reasons.push(`It sets ${command.target.channel} to ${showValue(command.value, command.unit)}, more than half its limit.`);
  }
  return reasons;
}

function askToConfirm(reasons) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = reasons.join(" ") + " Send it?";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("confirm-no").focus();
  });
}

async function onSend(event) {
  event.preventDefault();
  for (const id of ["f-value", "f-duration", "f-expiry"]) $(id).dataset.touched = "true";
  if (state.inFlight !== null) return;
  const built = validate();
  if (!built) {
    const bad = document.querySelector("#send-form [aria-invalid=true]");
    bad?.focus();
    return;
  }
  const reasons = confirmation(built.command, built.channel);
  state.inFlight = built.command.command_id; // no double send while the dialog is open
  validate();
  if (reasons.length > 0 && !(await askToConfirm(reasons))) {
    state.inFlight = null;
    validate();
    return;
  }
  const command = { ...built.command, timestamp: new Date().toISOString() };
  state.inFlight = command.command_id;
  // Every frame gets an answer; should none come, Send does not stay locked forever.
  setTimeout(() => {
    if (state.inFlight === command.command_id) { state.inFlight = null; validate(); }
  }, 15000);
  let handle;
  try {
    handle = state.client.send(command);
  } catch (err) {
    state.inFlight = null;
    $("send-status").textContent = err.message;
    validate();
    return;
  }
  $("f-emergency").checked = false; // the next send is normal unless ticked again
  rememberSent(command.command_id);
  upsertRow(command.command_id, { command, actor: `user:${state.me.user_id}`, mine: true });
  handle.onUpdate(() => {
    if (state.inFlight === command.command_id && handle.answered) {
      state.inFlight = null;
      validate();
    }
  });
  validate();
}

function rememberSent(id) {
  const sent = JSON.parse(sessionStorage.getItem(SENT_KEY) || "[]");
  sent.push(id);
  sessionStorage.setItem(SENT_KEY, JSON.stringify(sent.slice(-200)));
}

// ---------------------------------------------------------------- command rows
function upsertRow(id, patch) {
  let row = state.rows.get(id);
  if (!row) {
    row = { id, command: null, actor: "", mine: false, expanded: false, fetched: false, history: null };
    state.rows.set(id, row);
  }
  Object.assign(row, patch);
  if (row.command?.source === state.me?.user_id || row.actor === `user:${state.me?.user_id}`) row.mine = true;
  renderRows();
  return row;
}

function onStatus(update) {
  const id = update.command_id;
  if (!id) {
    if (update.status === "rejected") $("send-status").textContent = `Refused: ${update.error?.message ?? ""}`;
    return;
  }
  const row = state.rows.get(id) ?? upsertRow(id, {});
  if (!row.command && !row.fetched) fetchCommand(row);
  const handle = state.client.handle(id);
  renderRows();
  if (row.mine && handle?.current === update) {
    announce(`${describe(row)}: ${statusWords(update)}`);
  }
  if (state.inFlight === id && answered(update.status)) {
    state.inFlight = null;
    validate();
  }
}

async function fetchCommand(row) {
  row.fetched = true;
  try {
    const view = await state.client.rest.command(row.id);
    const first = view.events[0];
    upsertRow(row.id, { command: view.command, actor: first?.actor ?? row.actor });
  } catch {
    // refused before admission: the row shows what the status update said
  }
}

function resumeMine() {
  const ids = JSON.parse(sessionStorage.getItem(SENT_KEY) || "[]");
  for (const id of ids) {
    const row = state.rows.get(id) ?? upsertRow(id, { mine: true });
    row.mine = true;
    state.client.track(id);
    if (!row.command) fetchCommand(row);
  }
  state.client.resync(ids).catch(() => {});
}

async function loadRecent() {
  if (!state.client) return;
  try {
    const page = await state.client.rest.history({ limit: HISTORY_ROWS });
    for (const r of page.rows) {
      const known = state.rows.get(r.command_id);
      const row = upsertRow(r.command_id, { history: r, actor: known?.actor || r.actor || "" });
      if (!FINAL.has(r.status)) state.client.track(r.command_id);
      if (r.command_type === "config_override" && r.status === "executed" && !row.fetched) {
        fetchCommand(row); // its duration, for the active overrides' countdown
      }
    }
    const open = page.rows
      .filter((r) => !FINAL.has(r.status) || r.command_type === "config_override")
      .map((r) => r.command_id);
    // The projection may lag: the ledger has the truth for the unfinished ones.
    await state.client.resync(open);
  } catch {
    // no audit database: the live rows and the ledger re-sync still work
  }
  renderRows();
  loadHistory();
}

function describe(row) {
  const c = row.command;
  if (c) return `${c.command_type} ${c.target.channel} ${showValue(c.value, c.unit)}`;
  const h = row.history;
  if (h) return `${h.command_type} ${h.channel} ${showValue(h.value, h.unit)}`;
  return row.id;
}

function statusWords(update) {
  if (isSuperseded(update)) return "superseded by a newer setpoint";
  let text = update.status.replace("_", " ");
  if (update.late) text += " (late)";
  if (update.error && !isSuperseded(update)) text += `: ${update.error.message}`;
  return text;
}

function currentOf(row) {
  const handle = state.client?.handle(row.id);
  if (handle?.current) return handle.current;
  if (row.history) return { status: row.history.status, at: row.history.issued_at, late: row.history.late,
    error: row.history.error_code ? { code: row.history.error_code, message: row.history.error_message ?? "" } : null };
  return null;
}

function firstAt(row) {
  const handle = state.client?.handle(row.id);
  return handle?.updates[0]?.at ?? row.history?.issued_at ?? row.command?.timestamp ?? "";
}

function renderRows() {
  const body = $("commands").tBodies[0];
  const rows = [...state.rows.values()]
    .filter((r) => state.scope === "all" || r.mine)
    .sort((a, b) => (firstAt(a) < firstAt(b) ? 1 : -1));
  const trs = [];
  for (const row of rows) {
    const c = row.command;
    const h = row.history;
    const current = currentOf(row);
    const status = current ? (isSuperseded(current) ? "superseded" : current.status) : "sent";
    const edge = state.edges.get(c?.target.edge_id ?? h?.edge_id);
    const statusCell = el("td", { class: `st st-${status}` }, el("span", { text: status.replace("_", " ") + (current?.late ? " (late)" : "") }));
    if (current?.error) statusCell.append(el("span", { class: "reason", text: isSuperseded(current) ? "a newer setpoint replaced it" : current.error.message }));
    const actions = el("td");
    const expand = el("button", { type: "button", class: "secondary", text: row.expanded ? "Hide steps" : "Steps",
      "aria-expanded": String(row.expanded), "aria-controls": `tl-${row.id}`, "data-focus-key": `${row.id}:steps` });
    expand.addEventListener("click", () => { row.expanded = !row.expanded; renderRows(); });
    actions.append(expand);
    if (current?.status === "queued" && edge?.can_control) {
      const cancel = el("button", { type: "button", class: "secondary", text: "Cancel", "aria-label": `Cancel ${describe(row)}`, "data-focus-key": `${row.id}:cancel` });
      cancel.addEventListener("click", () => cancelCommand(row, cancel));
      actions.append(cancel);
    }
    statusCell.dataset.label = "Status";
    actions.dataset.label = "";
    const tr = el("tr", { "data-command": row.id, "data-status": status },
      el("td", { "data-label": "Type", text: c?.command_type ?? h?.command_type ?? "" }),
      el("td", { "data-label": "Target", text: c ? `${c.target.edge_id} / ${c.target.device_id} / ${c.target.channel}` : h ? `${h.edge_id} / ${h.device_id} / ${h.channel}` : "" }),
      el("td", { "data-label": "Value", text: c ? showValue(c.value, c.unit) : h ? showValue(h.value, h.unit) : "" }),
      el("td", { "data-label": "User", text: (row.actor || "").replace(/^user:/, "") || c?.source || h?.source || "" }),
      el("td", { "data-label": "Priority", text: c?.priority ?? h?.priority ?? "normal" }),
      statusCell,
      el("td", { class: "age", "data-label": "Age", "data-at": firstAt(row), text: age(firstAt(row)) }),
      actions);
    trs.push(tr);
    if (row.expanded) trs.push(timelineRow(row));
  }
  replaceKeepingFocus(body, trs);
  $("commands-empty").hidden = rows.length > 0;
  renderOverrides();
}

function timelineRow(row) {
  const handle = state.client?.handle(row.id);
  const steps = handle?.updates ?? [];
  const list = el("ol", { class: "timeline" });
  let previous = null;
  const start = steps[0] ? Date.parse(steps[0].at) : 0;
  for (const step of steps) {
    const t = Date.parse(step.at);
    const since = previous === null ? "" : ` (+${t - previous} ms, ${t - start} ms in total)`;
    list.append(el("li", { "data-step": step.status, text: `${clock(step.at)} ${statusWords(step)}${since}` }));
    previous = t;
  }
  if (steps.length === 0) list.append(el("li", { text: "Steps are loading from the ledger…" }));
  return el("tr", { class: "timeline-row", id: `tl-${row.id}` }, el("td", { colSpan: 8 }, list));
}

async function cancelCommand(row, button) {
  button.disabled = true;
  try {
    const answer = await state.client.cancel(row.id);
    announce(answer.status === "cancelled" ? `${describe(row)} cancelled` : `Not cancelled: ${answer.error?.message ?? answer.status}`);
  } catch (err) {
    announce(`Not cancelled: ${err.message}`);
  }
  renderRows();
}

function renderOverrides() {
  const items = [];
  for (const row of state.rows.values()) {
    const c = row.command;
    if (!c || c.command_type !== "config_override") continue;
    const handle = state.client?.handle(row.id);
    const done = handle?.updates.find((u) => u.status === "executed");
    if (!done || !c.duration_sec) continue;
    const ends = Date.parse(done.at) + c.duration_sec * 1000;
    const left = Math.round((ends - Date.now()) / 1000);
    if (left <= 0) continue;
    items.push(el("li", { text: `${c.target.device_id} / ${c.target.channel} = ${showValue(c.value, c.unit)}: ends in ${Math.floor(left / 60)} min ${left % 60} s` }));
  }
  $("overrides").replaceChildren(...items);
  $("overrides-empty").hidden = items.length > 0;
}

function tick() {
  tickExpiry();
  for (const cell of document.querySelectorAll("#commands td.age")) cell.textContent = age(cell.dataset.at);
  renderOverrides();
}

// ---------------------------------------------------------------- history and refusals
function historyParams() {
  const form = new FormData($("history-form"));
  const params = {};
  for (const [key, value] of form.entries()) {
    const text = String(value).trim();
    if (!text) continue;
    params[key] = key === "since" || key === "until" ? new Date(text + "Z").toISOString() : text;
  }
  return params;
}

async function loadHistory(event) {
  event?.preventDefault();
  if (!state.client) return;
  $("history-error").textContent = "";
  try {
    const page = await state.client.rest.history({ ...historyParams(), limit: HISTORY_ROWS });
    $("history").tBodies[0].replaceChildren(...page.rows.map((r) => el("tr", { "data-command": r.command_id },
      el("td", { text: clock(String(r.issued_at ?? "")) }),
      el("td", { text: `${r.command_type} ${r.command_id}` }),
      el("td", { text: `${r.edge_id} / ${r.device_id} / ${r.channel}` }),
      el("td", { text: showValue(r.value, r.unit) }),
      el("td", { text: String(r.actor ?? r.source ?? "").replace(/^user:/, "") }),
      el("td", { class: `st st-${r.status}`, text: r.status + (r.error_code ? ` (${r.error_code})` : "") }),
      el("td", { text: r.total_ms == null ? "" : String(r.total_ms) }))));
  } catch (err) {
    $("history-error").textContent = `History is not available: ${err.message}`;
  }
}

async function exportHistory() {
  try {
    const csv = await state.client.rest.exportHistory(historyParams());
    const url = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    const link = el("a", { href: url, download: "commands.csv" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (err) {
    $("history-error").textContent = `Export failed: ${err.message}`;
  }
}

async function loadRefusals() {
  $("refusals-error").textContent = "";
  try {
    const page = await state.client.rest.rejections({ limit: HISTORY_ROWS });
    if (page.rows.length === 0) {
      $("refusals").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 5,
        text: "No refusal is recorded for the edges you may view." })));
      return;
    }
    $("refusals").tBodies[0].replaceChildren(...page.rows.map((r) => el("tr", {},
      el("td", { text: clock(String(r.at ?? "")) }),
      el("td", { text: String(r.actor ?? "") }),
      el("td", { text: String(r.edge_id ?? "") }),
      el("td", { text: String(r.error_code ?? "") }),
      el("td", { text: String(r.error_message ?? "") }))));
  } catch (err) {
    $("refusals-error").textContent = `Refusals are not available: ${err.message}`;
  }
}

// ---------------------------------------------------------------- wiring
function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) { $("token-error").textContent = "Paste your access token first."; $("token").setAttribute("aria-invalid", "true"); return; }
    signIn(token);
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("f-edge").addEventListener("change", onEdgeChange);
  $("f-type").addEventListener("change", onTypeChange);
  $("f-channel").addEventListener("change", onChannelChange);
  $("f-unit").addEventListener("change", () => { describeLimits(); validate(); });
  $("f-controller").addEventListener("change", onControllerChange);
  for (const id of ["f-value", "f-duration", "f-expiry"]) {
    $(id).addEventListener("input", () => { $(id).dataset.touched = "true"; validate(); });
    $(id).addEventListener("blur", () => { $(id).dataset.touched = "true"; validate(); });
  }
  $("send-form").addEventListener("submit", onSend);
  for (const radio of document.querySelectorAll("input[name=scope]")) {
    radio.addEventListener("change", () => { state.scope = radio.value; renderRows(); });
  }
  $("h-status").append(...STATUSES.map((s) => el("option", { value: s, text: s })));
  $("history-form").addEventListener("submit", loadHistory);
  $("h-export").addEventListener("click", exportHistory);
  $("refusals-load").addEventListener("click", loadRefusals);
  onTypeChange();
  if (location.hash || location.search) {
    // Old demo links carried the token in the URL: drop it from the address bar and
    // do not use it (a token in a URL ends up in browser history files).
    history.replaceState(null, "", location.pathname);
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token); else showSignIn("");
}

wire();
