// One row per command with its current status and timeline; cancel; active overrides;
// re-sync after a reload.
import { FINAL, errorWords, isSuperseded } from "../client/index.js";
import { SENT_KEY, HISTORY_ROWS, state } from "./state.js";
import { el, replaceKeepingFocus, announce, age, clock, showValue, $ } from "./dom.js";
import { loadHistory } from "./history.js";

export function upsertRow(id, patch) {
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

export function onStatus(update) {
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
}

export async function fetchCommand(row) {
  row.fetched = true;
  try {
    const view = await state.client.rest.command(row.id);
    const first = view.events[0];
    upsertRow(row.id, { command: view.command, actor: first?.actor ?? row.actor });
  } catch {
    // refused before admission: the row shows what the status update said
  }
}

export function resumeMine() {
  const ids = JSON.parse(sessionStorage.getItem(SENT_KEY) || "[]");
  for (const id of ids) {
    const row = state.rows.get(id) ?? upsertRow(id, { mine: true });
    row.mine = true;
    state.client.track(id);
    if (!row.command) fetchCommand(row);
  }
  state.client.resync(ids).catch(() => {});
}

export async function loadRecent() {
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

export function describe(row) {
  const c = row.command;
  if (c) return `${c.command_type} ${c.target.channel} ${showValue(c.value, c.unit)}`;
  const h = row.history;
  if (h) return `${h.command_type} ${h.channel} ${showValue(h.value, h.unit)}`;
  return row.id;
}

export function statusWords(update) {
  if (isSuperseded(update)) return "superseded by a newer setpoint";
  let text = update.status.replace("_", " ");
  if (update.late) text += " (late)";
  if (update.error && !isSuperseded(update)) text += `: ${errorWords(update.error)}`;
  return text;
}

export function currentOf(row) {
  const handle = state.client?.handle(row.id);
  if (handle?.current) return handle.current;
  if (row.history) return { status: row.history.status, at: row.history.issued_at, late: row.history.late,
    error: row.history.error_code ? { code: row.history.error_code, message: row.history.error_message ?? "" } : null };
  return null;
}

export function firstAt(row) {
  const handle = state.client?.handle(row.id);
  return handle?.updates[0]?.at ?? row.history?.issued_at ?? row.command?.timestamp ?? "";
}

export function renderRows() {
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
    if (current?.error) statusCell.append(el("span", { class: "reason", text: isSuperseded(current) ? "a newer setpoint replaced it" : errorWords(current.error) }));
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

export function timelineRow(row) {
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

export async function cancelCommand(row, button) {
  button.disabled = true;
  try {
    const answer = await state.client.cancel(row.id);
    announce(answer.status === "cancelled" ? `${describe(row)} cancelled` : `Not cancelled: ${answer.error?.message ?? answer.status}`);
  } catch (err) {
    announce(`Not cancelled: ${err.message}`);
  }
  renderRows();
}

export function renderOverrides() {
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

/** Once a second: ages and override countdowns move on. */
export function tickRows() {
  for (const cell of document.querySelectorAll("#commands td.age")) cell.textContent = age(cell.dataset.at);
  renderOverrides();
}
