// Audit history with filters and CSV export, and the refusals list.
import { HISTORY_ROWS, state } from "./state.js";
import { el, clock, showValue, $ } from "./dom.js";

export function historyParams() {
  const form = new FormData($("history-form"));
  const params = {};
  for (const [key, value] of form.entries()) {
    const text = String(value).trim();
    if (!text) continue;
    params[key] = key === "since" || key === "until" ? new Date(text + "Z").toISOString() : text;
  }
  return params;
}

export async function loadHistory(event) {
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

export async function exportHistory() {
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

export async function loadRefusals() {
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
