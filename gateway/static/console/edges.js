// Edges the user may view: presence, queue depth and capability config, polled.
import { state } from "./state.js";
import { el, replaceKeepingFocus, age, $ } from "./dom.js";
import { onEdgeChange, updateFormAccess } from "./form.js";

export async function loadEdges() {
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

export function renderEdges() {
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

export function fillEdgePicker() {
  const picker = $("f-edge");
  picker.replaceChildren(...[...state.edges.keys()].map((id) => el("option", { value: id, text: id })));
  onEdgeChange();
}
