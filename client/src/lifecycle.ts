// What a status means for a command: which ones end it, which replace which, and the
// words an operator reads. Shared by the client (re-sync, in-flight) and the console.
import type { Status, StatusUpdate } from "./types.js";

/** Statuses after which nothing more happens to a command. */
export const FINAL: ReadonlySet<string> = new Set<Status>([
  "executed",
  "failed",
  "rejected",
  "expired",
  "cancelled",
]);

// A later status never goes back to an earlier one; a result after `timed_out` or `lost`
// (marked late) replaces them.
const RANK: Record<string, number> = {
  issued: 0,
  authorized: 1,
  queued: 2,
  routed: 3,
  delivered: 4,
  timed_out: 5,
  lost: 5,
  executed: 6,
  failed: 6,
  rejected: 6,
  expired: 6,
  cancelled: 6,
};

export function rank(status: string): number {
  return RANK[status] ?? -1;
}

/** True when `next` should replace `current` as the command's current status. */
export function replaces(current: StatusUpdate | undefined, next: StatusUpdate): boolean {
  if (current === undefined) return true;
  const a = rank(current.status);
  const b = rank(next.status);
  if (b !== a) return b > a;
  return next.at >= current.at;
}

/** A failure that is not an operator's concern: a newer setpoint replaced this one. */
export function isSuperseded(update: StatusUpdate): boolean {
  return update.error?.code === "superseded";
}

/** The command has its answer: no need to keep the Send button disabled for it. */
export function answered(status: string): boolean {
  return FINAL.has(status) || status === "queued" || status === "timed_out" || status === "lost";
}

const CLOSE_WORDS: Record<number, string> = {
  1000: "closed normally",
  1001: "the gateway is shutting down or restarting; reconnecting",
  1005: "the connection closed without a reason",
  1006: "the connection was lost (network down, gateway unreachable, or the sign-in was refused)",
  1007: "the gateway refused a frame that is not UTF-8",
  1008: "the gateway refused the connection (policy)",
  1009: "a frame was larger than the gateway accepts",
  1011: "the gateway hit an internal error",
  1012: "the gateway is restarting; reconnecting",
  1013: "the gateway dropped this page because it read too slowly; reconnecting",
  4001: "another connection replaced this one",
  4003: "your token expired or was revoked: sign in again",
};

/** A WebSocket close code in plain words. */
export function closeCodeWords(code: number): string {
  return CLOSE_WORDS[code] ?? `the connection closed (code ${code})`;
}

const ERROR_WORDS: Record<string, string> = {
  malformed_json: "The gateway could not read the command",
  invalid_command: "The command's format was refused",
  too_large: "The command is too large",
  unauthenticated: "Your sign-in is no longer valid",
  forbidden: "You may not control this edge",
  rate_limited: "Too many commands: wait a moment",
  unknown_edge: "The edge is not enrolled",
  duplicate: "This command id was already used for another command",
  expired: "It expired before the edge could run it",
  clock_skew: "This computer's clock is ahead of the gateway's",
  unavailable: "The gateway's store did not answer: try again",
  not_cancellable: "Too late to cancel: it was already sent",
  unknown_device: "The edge has no such device",
  unknown_channel: "The device has no such channel",
  not_writable: "This channel is read-only",
  out_of_range: "Outside the channel's limits",
  wrong_type: "The value has the wrong type for this channel",
  wrong_unit: "The edge cannot convert this unit",
  unknown_controller: "The edge has no such controller",
  unknown_mode: "The controller has no such mode",
  wrong_target: "This command type does not apply to that target",
  edge_busy: "The edge's queue is full: try again",
  device_error: "The device refused or failed the write",
  device_timeout: "The device did not answer",
  readback_mismatch: "The device reads back another value",
  outcome_unknown: "Unknown whether the device took the value: check it",
  interrupted: "The edge stopped while running it",
  timeout: "No answer from the edge within 10 s",
  cancelled: "Cancelled before it was sent",
  lost: "Its delivery record vanished: check the device",
};

/** An error in plain words, followed by the gateway's or edge's detail. */
export function errorWords(error: { code: string; message: string }): string {
  const words = ERROR_WORDS[error.code];
  return words ? `${words}. ${error.message}` : error.message;
}
