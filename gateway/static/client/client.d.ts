import { Rest } from "./rest.js";
import type { Command, StatusUpdate } from "./types.js";
/** At most this many commands are re-subscribed and re-read after a reconnect. */
export declare const RESYNC_LIMIT = 256;
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";
export interface ConnectionEvent {
    state: ConnectionState;
    /** The close code of the socket that just ended, and what it means. */
    code?: number;
    words?: string;
    /** Next attempt in this many ms (state `reconnecting`). */
    retryInMs?: number;
}
export interface ClientOptions {
    /** The gateway's HTTP origin, e.g. `http://127.0.0.1:8000`. */
    baseUrl: string;
    /** The user's JWT; a function is asked again before every (re)connection. */
    token: string | (() => string);
    WebSocket?: typeof WebSocket;
    fetch?: typeof fetch;
    /** First reconnect delay and the ceiling it doubles up to (ms). */
    backoffInitialMs?: number;
    backoffMaxMs?: number;
    random?: () => number;
}
type Listener<T> = (value: T) => void;
/** One command this client follows: every status as it arrives, and the current one. */
export declare class CommandHandle implements AsyncIterable<StatusUpdate> {
    readonly commandId: string;
    readonly updates: StatusUpdate[];
    current: StatusUpdate | undefined;
    private readonly seen;
    private readonly listeners;
    private wake;
    private settle;
    /** Resolves with the final status (executed, failed, rejected, expired, cancelled). */
    readonly done: Promise<StatusUpdate>;
    constructor(commandId: string);
    get final(): boolean;
    /** The command has an answer (final, queued, timed out): no longer "in flight". */
    get answered(): boolean;
    onUpdate(listener: Listener<StatusUpdate>): () => void;
    /** Record an update; false when it was already known (same event, or same status+time). */
    add(update: StatusUpdate): boolean;
    [Symbol.asyncIterator](): AsyncIterator<StatusUpdate>;
}
export declare class DispatchClient {
    private readonly options;
    readonly rest: Rest;
    state: ConnectionState;
    private socket;
    private readonly tracked;
    private readonly statusListeners;
    private readonly connectionListeners;
    private readonly resyncListeners;
    private attempt;
    private timer;
    private stopped;
    private subscribePending;
    private readonly token;
    private readonly WS;
    private readonly random;
    constructor(options: ClientOptions);
    /** Every status update this session receives (its own commands and those it may view). */
    onStatus(listener: Listener<StatusUpdate>): () => void;
    onConnection(listener: Listener<ConnectionEvent>): () => void;
    /** Called with the ids re-read from the ledger after a reconnect. */
    onResync(listener: Listener<string[]>): () => void;
    /** Open the socket; resolves once it is open (rejects if the first attempt fails). */
    connect(): Promise<void>;
    /** Close for good (no reconnect). */
    close(): void;
    /** Send a command; its lifecycle arrives on the returned handle as it happens. */
    send(command: Command): CommandHandle;
    /** Follow a command (sent earlier, by this page or another) from now on. */
    track(commandId: string): CommandHandle;
    handle(commandId: string): CommandHandle | undefined;
    /** Cancel a queued command; the answer says `cancelled` or why not. */
    cancel(commandId: string): Promise<StatusUpdate>;
    /** Re-read the tracked, unfinished commands from the ledger (after a gap). */
    resync(ids?: string[]): Promise<void>;
    private open;
    private afterOpen;
    private retry;
    private receive;
    private deliver;
    private emitConnection;
}
export {};
