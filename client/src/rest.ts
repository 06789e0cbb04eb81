// The gateway's HTTP API: history, refusals, one command's lifecycle, cancel, edges.
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
export class GatewayError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "GatewayError";
  }
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
  devices: { device_id: string; channels: ChannelConfig[] }[];
  controllers: { name: string; modes: string[]; default_mode?: string; running?: boolean }[];
}

export interface Me {
  user_id: string;
  actor: string;
  expires_at: string;
}

type Fetch = typeof fetch;

function query(params: object): string {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(key, String(value));
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

export class Rest {
  constructor(
    private readonly baseUrl: string,
    private readonly token: () => string,
    private readonly fetchImpl: Fetch,
  ) {}

  async request(method: string, path: string): Promise<Response> {
    const response = await this.fetchImpl(this.baseUrl + path, {
      method,
      headers: { Authorization: `Bearer ${this.token()}` },
      cache: "no-store",
    });
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = `${method} ${path} answered ${response.status}`;
      try {
        const body = (await response.json()) as { error?: { code?: string; message?: string } };
        code = body.error?.code ?? code;
        message = body.error?.message ?? message;
      } catch {
        // not JSON: keep the generic words
      }
      throw new GatewayError(response.status, code, message);
    }
    return response;
  }

  async json<T>(method: string, path: string): Promise<T> {
    return (await (await this.request(method, path)).json()) as T;
  }

  me(): Promise<Me> {
    return this.json<Me>("GET", "/api/me");
  }

  async edges(): Promise<EdgeSummary[]> {
    return (await this.json<{ edges: EdgeSummary[] }>("GET", "/api/edges")).edges;
  }

  capabilities(edgeId: string): Promise<SiteConfig> {
    return this.json<SiteConfig>("GET", `/api/edges/${encodeURIComponent(edgeId)}/capabilities`);
  }

  command(commandId: string): Promise<CommandView> {
    return this.json("GET", `/api/commands/${encodeURIComponent(commandId)}`);
  }

  /** The gateway's answer to a cancel: `cancelled`, or why not (`not_cancellable`...). */
  async cancel(commandId: string): Promise<StatusUpdate> {
    const response = await this.fetchImpl(
      `${this.baseUrl}/api/commands/${encodeURIComponent(commandId)}/cancel`,
      { method: "POST", headers: { Authorization: `Bearer ${this.token()}` } },
    );
    // Every answer (cancelled, not_cancellable, unknown_command...) is a status update.
    return (await response.json()) as StatusUpdate;
  }

  async history(params: HistoryQuery = {}): Promise<Page<HistoryRow>> {
    const body = await this.json<{ commands: HistoryRow[]; next_cursor: string | null }>(
      "GET",
      "/api/commands" + query(params),
    );
    return { rows: body.commands, next_cursor: body.next_cursor };
  }

  async rejections(params: RefusalQuery = {}): Promise<Page<Record<string, unknown>>> {
    const body = await this.json<{
      rejections: Record<string, unknown>[];
      next_cursor: string | null;
    }>("GET", "/api/rejections" + query(params));
    return { rows: body.rejections, next_cursor: body.next_cursor };
  }

  /** Every matching history row as CSV text (the gateway streams the export). */
  async exportHistory(params: HistoryQuery = {}): Promise<string> {
    const response = await this.request("GET", "/api/commands" + query({ ...params, format: "csv" }));
    return response.text();
  }
}
