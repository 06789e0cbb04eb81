// The command form: pickers and limits from the capabilities, checks next to each
// field in plain words, confirmation, one send at a time.
import { newCommandId, checkChannelValue, isLargeChange, parseWhole, unitChoices, formatIn } from "../client/index.js";
import { SENT_KEY, state } from "./state.js";
import { el, showValue, $ } from "./dom.js";
import { upsertRow } from "./commands.js";

export function currentConfig() {
  return state.configs.get($("f-edge").value) ?? null;
}

export function writableChannels(config) {
  const out = [];
  for (const device of config?.devices ?? []) {
    for (const ch of device.channels) {
      if (ch.access !== "read") out.push({ device: device.device_id, channel: ch });
    }
  }
  return out;
}

export function onEdgeChange() {
  const config = currentConfig();
  $("f-channel").replaceChildren(...writableChannels(config).map(({ device, channel }) =>
    el("option", { value: `${device}/${channel.name}`, text: `${device} / ${channel.name}` })));
  $("f-controller").replaceChildren(...(config?.controllers ?? []).map((c) =>
    el("option", { value: c.name, text: c.name.replace(/_/g, " ") })));
  onChannelChange();
  onControllerChange();
  updateFormAccess();
}

export function selectedChannel() {
  const [device, name] = $("f-channel").value.split("/");
  const found = writableChannels(currentConfig()).find((c) => c.device === device && c.channel.name === name);
  return found ?? null;
}

export function onChannelChange() {
  const picked = selectedChannel();
  const unit = $("f-unit");
  const choices = picked ? unitChoices(picked.channel.unit) : [];
  unit.replaceChildren(...choices.map((c) => el("option", { value: c.unit, text: c.unit })));
  describeLimits();
  validate();
}

export function describeLimits() {
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

export function onControllerChange() {
  const config = currentConfig();
  const controller = config?.controllers.find((c) => c.name === $("f-controller").value);
  $("f-mode").replaceChildren(...(controller?.modes ?? []).map((m) => el("option", { value: m, text: m })));
  validate();
}

export function onTypeChange() {
  const type = $("f-type").value;
  for (const field of document.querySelectorAll("[data-for]")) {
    field.hidden = !field.dataset.for.split(" ").includes(type);
  }
  validate();
}

export function updateFormAccess() {
  const edge = state.edges.get($("f-edge").value);
  const readOnly = edge !== undefined && !edge.can_control;
  $("send-readonly").hidden = !readOnly;
  $("send-fields").disabled = readOnly || edge === undefined;
  validate();
}

// ---------------------------------------------------------------- the command form
export function setError(inputId, message) {
  const input = $(inputId);
  const out = $(`${inputId}-error`);
  const shown = input.dataset.touched === "true" ? message : "";
  out.textContent = shown;
  input.setAttribute("aria-invalid", shown ? "true" : "false");
}

/** The command the form describes, or null (each bad field says why next to it). */
export function validate() {
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

export function confirmation(command, channel) {
  const reasons = [];
  if (command.priority === "emergency") reasons.push("It goes out with EMERGENCY priority and is applied at once.");
  if (command.command_type === "system" && command.value === "restart") reasons.push(`It restarts the edge ${command.target.edge_id}.`);
  if (channel && typeof command.value === "number" && isLargeChange(command.value, channel)) {
    reasons.push(`It sets ${command.target.channel} to ${showValue(command.value, command.unit)}, more than half its limit.`);
  }
  return reasons;
}

export function askToConfirm(reasons) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = reasons.join(" ") + " Send it?";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    $("confirm-no").focus();
  });
}

export async function onSend(event) {
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

export function rememberSent(id) {
  const sent = JSON.parse(sessionStorage.getItem(SENT_KEY) || "[]");
  sent.push(id);
  sessionStorage.setItem(SENT_KEY, JSON.stringify(sent.slice(-200)));
}
