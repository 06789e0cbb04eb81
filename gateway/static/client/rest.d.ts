import type { Command, StatusUpdate } from "./types.js";
/** `GET /api/commands/{id}`: the command, its current status and its lifecycle events. */
export interface CommandView {
    command_id: string;
    edge_id: string;
    status: string;
    late?: boolean;
    command: Command & Record<string, unknown>;
    events: (StatusUpdate & Record<string, unknown>)[];
}
/** A 4xx/5xx answer of the gateway, with its machine code and human message. */
export declare class GatewayError extends Error {
    readonly status: number;
    readonly code: string;
    constructor(status: number, code: string, message: string);
}
export interface HistoryQuery {
    edge_id?: string;
    source?: string;
    status?: string;
    since?: string;
    until?: string;
    limit?: number;
    cursor?: string;
}
export interface RefusalQuery {
    edge_id?: string;
    user?: string;
    code?: string;
    since?: string;
    until?: string;
    limit?: number;
    cursor?: string;
}
/** One row of the audit projection (`GET /api/commands`). */
export interface HistoryRow {
    command_id: string;
    edge_id: string;
    command_type: string;
    device_id: string;
    channel: string;
    value: unknown;
    unit: string | null;
    status: string;
    [column: string]: unknown;
}
export interface Page<Row> {
    rows: Row[];
    next_cursor: string | null;
}
export interface EdgeSummary {
    edge_id: string;
    online: boolean;
    last_seen: string | null;
    queue_depth: number | null;
    can_control: boolean;
}
export interface ChannelConfig {
    name: string;
    data_type: string;
    unit: string;
    access: string;
    min?: number | null;
    max?: number | null;
}
export interface SiteConfig {
    version: string;
    edge_id: string;
    devices: {
        device_id: string;
        channels: ChannelConfig[];
    }[];
    controllers: {
        name: string;
        modes: string[];
        default_mode?: string;
        running?: boolean;
    }[];
}
export interface Me {
    user_id: string;
    actor: string;
    expires_at: string;
}
type Fetch = typeof fetch;
export declare class Rest {
    private readonly baseUrl;
    private readonly token;
    private readonly fetchImpl;
    constructor(baseUrl: string, token: () => string, fetchImpl: Fetch);
    request(method: string, path: string): Promise<Response>;
    json<T>(method: string, path: string): Promise<T>;
    me(): Promise<Me>;
    edges(): Promise<EdgeSummary[]>;
    capabilities(edgeId: string): Promise<SiteConfig>;
    command(commandId: string): Promise<CommandView>;
    /** The gateway's answer to a cancel: `cancelled`, or why not (`not_cancellable`...). */
    cancel(commandId: string): Promise<StatusUpdate>;
    history(params?: HistoryQuery): Promise<Page<HistoryRow>>;
    rejections(params?: RefusalQuery): Promise<Page<Record<string, unknown>>>;
    /** Every matching history row as CSV text (the gateway streams the export). */
    exportHistory(params?: HistoryQuery): Promise<string>;
}
export {};
