/** `POST /api/commands` 202 body. */
export interface Accepted {
    command_id: string;
    status: string;
}
/** Dashboard/cloud -> gateway: the specification's command object. */
export interface Command {
    /** Client-chosen idempotency key: letters, digits, '_', '.', ':', '-'. */
    command_id: string;
    command_type: CommandType;
    target: Target;
    value: boolean | number | string;
    unit?: string | null;
    expiry_sec?: number | null;
    /** Who asked (as claimed). */
    source: string;
    /** RFC 3339 timestamp with offset. */
    timestamp: string;
    priority?: "emergency" | "normal";
    duration_sec?: number | null;
    traceparent?: string | null;
}
/** Dashboard -> gateway: an operation on an existing command (contract addition). */
export interface CommandControl {
    type: "cancel";
    /** Client-chosen idempotency key: letters, digits, '_', '.', ':', '-'. */
    command_id: string;
}
/** CommandType */
export type CommandType = "config_override" | "mode_change" | "scheduler_control" | "setpoint" | "system";
/** ErrorCode */
export type ErrorCode = "cancelled" | "clock_skew" | "config_sync_failed" | "device_error" | "device_timeout" | "duplicate" | "edge_busy" | "expired" | "forbidden" | "internal" | "interrupted" | "invalid_command" | "lost" | "malformed_json" | "not_cancellable" | "not_writable" | "out_of_range" | "outcome_unknown" | "protocol_error" | "rate_limited" | "readback_mismatch" | "slow_consumer" | "superseded" | "timeout" | "too_large" | "unauthenticated" | "unavailable" | "unknown_channel" | "unknown_command" | "unknown_controller" | "unknown_device" | "unknown_edge" | "unknown_mode" | "wrong_edge" | "wrong_target" | "wrong_type" | "wrong_unit";
/** `{code, message}` plus optional hints; `code` is machine-readable, `message` human. */
export interface ErrorObject {
    code: string;
    message: string;
    retry_after_s?: number | null;
    limit?: string | null;
}
/** Status */
export type Status = "authorized" | "cancelled" | "delivered" | "executed" | "expired" | "failed" | "issued" | "lost" | "queued" | "rejected" | "routed" | "timed_out";
/** One lifecycle transition of a command, as the dashboard sees it. */
export interface StatusUpdate {
    command_id: string | null;
    status: string;
    at: string;
    edge_id?: string | null;
    error?: ErrorObject | null;
    late?: boolean;
    delivery?: number | null;
    event_id?: string | null;
}
/** Dashboard -> gateway: follow commands again (after a reconnect). Answered by one `Subscribed` frame; from then on the session receives every status of those commands, as it does for the commands it sent itself. */
export interface Subscribe {
    type: "subscribe";
    command_ids: string[];
}
/** Gateway -> dashboard: the current status of each subscribed command. Commands the user neither sent nor may view are listed as `unknown` (no leak). */
export interface Subscribed {
    type?: "subscribed";
    statuses: StatusUpdate[];
    unknown: string[];
}
/** Target */
export interface Target {
    /** Edge identifier: letters, digits, '_', '.', '-' (1-64 chars). */
    edge_id: string;
    /** Device or channel name. */
    device_id: string;
    /** Device or channel name. */
    channel: string;
}
