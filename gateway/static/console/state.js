// Constants and the one state object the console modules share.

export const TOKEN_KEY = "dispatch.token";
export const SENT_KEY = "dispatch.sent";
export const EDGE_POLL_MS = 2000;
export const HISTORY_ROWS = 50;
export const STATUSES = ["issued", "authorized", "queued", "routed", "delivered", "executed", "failed",
  "rejected", "timed_out", "expired", "cancelled", "lost"];

export const state = {
  client: null,
  me: null,
  edges: new Map(),      // edge_id -> summary from /api/edges
  configs: new Map(),    // edge_id -> capability config
  rows: new Map(),       // command_id -> row model
  scope: "mine",
  inFlight: null,        // command id whose answer Send waits for
  timers: [],
  retry: undefined,      // the next sign-in attempt while the gateway is unreachable
};
