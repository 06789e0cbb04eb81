// The operator console: sign in, pick an edge, send commands checked against its
// capabilities, follow every command's lifecycle, read the audit history. This module
// signs in, follows the connection and wires the page; console/ holds the parts.
import { DispatchClient, GatewayError, closeCodeWords } from "./client/index.js";
import { TOKEN_KEY, SENT_KEY, EDGE_POLL_MS, STATUSES, state } from "./console/state.js";
import { el, $ } from "./console/dom.js";
import { loadEdges } from "./console/edges.js";
import { onEdgeChange, onChannelChange, describeLimits, onControllerChange, onTypeChange, validate, onSend } from "./console/form.js";
import { onStatus, resumeMine, loadRecent, renderRows, tickRows } from "./console/commands.js";
import { loadHistory, exportHistory, loadRefusals } from "./console/history.js";

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
    if (err instanceof GatewayError && err.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(`The gateway refused this token: ${err.message}`);
      return;
    }
    // The gateway is away (restarting?): keep the token and try again by ourselves.
    sessionStorage.setItem(TOKEN_KEY, token);
    showSignIn(`The gateway could not be reached (${err.message}); trying again every 3 s.`);
    state.retry = setTimeout(() => signIn(token), 3000);
    return;
  }
  clearTimeout(state.retry);
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
  state.timers.push(setInterval(() => { tickExpiry(); tickRows(); }, 1000));
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


// ---------------------------------------------------------------- wiring
function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(state.retry);
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
