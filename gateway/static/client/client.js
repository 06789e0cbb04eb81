// The dashboard connection: sign in over `/ws/dashboard`, send commands and follow their
// lifecycle, reconnect with backoff and fill the gap from the ledger.
import { answered, closeCodeWords, FINAL, replaces } from "./lifecycle.js";
import { GatewayError, Rest } from "./rest.js";
/** At most this many commands are re-subscribed and re-read after a reconnect. */
export const RESYNC_LIMIT = 256;
/** One command this client follows: every status as it arrives, and the current one. */
export class CommandHandle {
    commandId;
    updates = [];
    current;
    seen = new Set();
    listeners = new Set();
    wake;
    settle;
    /** Resolves with the final status (executed, failed, rejected, expired, cancelled). */
    done;
    constructor(commandId) {
        this.commandId = commandId;
        this.done = new Promise((resolve) => (this.settle = resolve));
    }
    get final() {
        return this.current !== undefined && FINAL.has(this.current.status);
    }
    /** The command has an answer (final, queued, timed out): no longer "in flight". */
    get answered() {
        return this.current !== undefined && answered(this.current.status);
    }
    onUpdate(listener) {
        this.listeners.add(listener);
        return () => this.listeners.delete(listener);
    }
    /** Record an update; false when it was already known (same event, or same status+time). */
    add(update) {
        const key = update.event_id ?? `${update.status}@${update.at}`;
        const twin = `${update.status}@${update.at}`;
        if (this.seen.has(key) || this.seen.has(twin))
            return false;
        this.seen.add(key);
        this.seen.add(twin);
        this.updates.push(update);
        this.updates.sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0));
        if (replaces(this.current, update))
            this.current = update;
        for (const listener of this.listeners)
            listener(update);
        this.wake?.();
        if (this.final && this.current !== undefined)
            this.settle(this.current);
        return true;
    }
    async *[Symbol.asyncIterator]() {
        let index = 0;
        for (;;) {
            while (index < this.updates.length) {
                const update = this.updates[index++];
                if (update !== undefined)
                    yield update;
            }
            if (this.final)
                return;
            await new Promise((resolve) => (this.wake = resolve));
        }
    }
}
export class DispatchClient {
    options;
    rest;
    state = "closed";
    socket;
    tracked = new Map();
    statusListeners = new Set();
    connectionListeners = new Set();
    resyncListeners = new Set();
    attempt = 0;
    timer;
    stopped = true;
    subscribePending = false;
    token;
    WS;
    random;
    constructor(options) {
        this.options = options;
        const token = options.token;
        this.token = typeof token === "function" ? token : () => token;
        this.WS = options.WebSocket ?? globalThis.WebSocket;
        this.random = options.random ?? Math.random;
        this.rest = new Rest(options.baseUrl.replace(/\/$/, ""), this.token, options.fetch ?? globalThis.fetch.bind(globalThis));
    }
    /** Every status update this session receives (its own commands and those it may view). */
    onStatus(listener) {
        this.statusListeners.add(listener);
        return () => this.statusListeners.delete(listener);
    }
    onConnection(listener) {
        this.connectionListeners.add(listener);
        return () => this.connectionListeners.delete(listener);
    }
    /** Called with the ids re-read from the ledger after a reconnect. */
    onResync(listener) {
        this.resyncListeners.add(listener);
        return () => this.resyncListeners.delete(listener);
    }
    /** Open the socket; resolves once it is open (rejects if the first attempt fails). */
    connect() {
        this.stopped = false;
        return new Promise((resolve, reject) => {
            const off = this.onConnection((event) => {
                if (event.state === "open") {
                    off();
                    resolve();
                }
                else if (event.state === "reconnecting" || event.state === "closed") {
                    off();
                    reject(new GatewayError(0, "not_connected", event.words ?? "could not connect"));
                }
            });
            this.open();
        });
    }
    /** Close for good (no reconnect). */
    close() {
        this.stopped = true;
        if (this.timer !== undefined)
            clearTimeout(this.timer);
        this.socket?.close(1000, "closed by the client");
        this.socket = undefined;
        this.emitConnection({ state: "closed" });
    }
    /** Send a command; its lifecycle arrives on the returned handle as it happens. */
    send(command) {
        const socket = this.socket;
        if (socket === undefined || this.state !== "open" || socket.readyState !== this.WS.OPEN) {
            throw new GatewayError(0, "not_connected", "not connected to the gateway: wait for it");
        }
        const handle = this.track(command.command_id);
        socket.send(JSON.stringify(command));
        return handle;
    }
    /** Follow a command (sent earlier, by this page or another) from now on. */
    track(commandId) {
        let handle = this.tracked.get(commandId);
        if (handle === undefined) {
            handle = new CommandHandle(commandId);
            this.tracked.set(commandId, handle);
        }
        return handle;
    }
    handle(commandId) {
        return this.tracked.get(commandId);
    }
    /** Cancel a queued command; the answer says `cancelled` or why not. */
    async cancel(commandId) {
        const answer = await this.rest.cancel(commandId);
        if (answer.command_id === commandId && answer.error?.code !== "not_cancellable") {
            this.deliver(answer);
        }
        return answer;
    }
    /** Re-read the tracked, unfinished commands from the ledger (after a gap). */
    async resync(ids) {
        const wanted = ids ??
            [...this.tracked.values()]
                .filter((h) => !h.final)
                .map((h) => h.commandId)
                .slice(-RESYNC_LIMIT);
        const read = await Promise.all(wanted.map(async (id) => {
            try {
                const view = await this.rest.command(id);
                for (const event of view.events) {
                    this.deliver({ ...event, command_id: id, edge_id: view.edge_id });
                }
                return id;
            }
            catch {
                return undefined; // not in the ledger (refused before admission) or not visible
            }
        }));
        const done = read.filter((id) => id !== undefined);
        for (const listener of this.resyncListeners)
            listener(done);
    }
    open() {
        if (this.stopped)
            return;
        this.emitConnection({ state: this.attempt === 0 ? "connecting" : "reconnecting" });
        const base = this.options.baseUrl.replace(/\/$/, "").replace(/^http/, "ws");
        let socket;
        try {
            // Browsers cannot set headers on a WebSocket: the token travels as a subprotocol.
            socket = new this.WS(`${base}/ws/dashboard`, ["dispatch.v1", `bearer.${this.token()}`]);
        }
        catch {
            this.retry(1006);
            return;
        }
        this.socket = socket;
        socket.onopen = () => {
            this.attempt = 0;
            this.state = "open";
            this.emitConnection({ state: "open" });
            void this.afterOpen(socket);
        };
        socket.onmessage = (message) => this.receive(String(message.data));
        socket.onclose = (event) => {
            if (this.socket !== socket)
                return;
            this.socket = undefined;
            this.state = "closed";
            if (event.code === 4003) {
                this.stopped = true; // the token ended: reconnecting with it cannot help
                this.emitConnection({ state: "closed", code: 4003, words: closeCodeWords(4003) });
                return;
            }
            this.retry(event.code);
        };
    }
    async afterOpen(socket) {
        // The newest unfinished commands (a console follows a few; a fleet's backlog stays
        // in the history view rather than costing a ledger read each on every reconnect).
        const pending = [...this.tracked.values()]
            .filter((h) => !h.final)
            .map((h) => h.commandId)
            .slice(-RESYNC_LIMIT);
        if (pending.length === 0)
            return;
        // Ask the gateway to follow them again; the ledger fills the gap either way (a
        // gateway without `subscribe` answers it with a refusal the client swallows).
        this.subscribePending = true;
        socket.send(JSON.stringify({ type: "subscribe", command_ids: pending }));
        await this.resync(pending);
    }
    retry(code) {
        this.state = "closed";
        if (this.stopped) {
            this.emitConnection({ state: "closed", code, words: closeCodeWords(code) });
            return;
        }
        const initial = this.options.backoffInitialMs ?? 250;
        const ceiling = this.options.backoffMaxMs ?? 8000;
        const delay = Math.min(ceiling, initial * 2 ** this.attempt) * (0.5 + this.random() / 2);
        this.attempt += 1;
        this.emitConnection({
            state: "reconnecting",
            code,
            words: closeCodeWords(code),
            retryInMs: Math.round(delay),
        });
        this.timer = setTimeout(() => this.open(), delay);
    }
    receive(text) {
        let frame;
        try {
            frame = JSON.parse(text);
        }
        catch {
            return;
        }
        if (typeof frame !== "object" || frame === null)
            return;
        const record = frame;
        if (record["type"] === "subscribed") {
            this.subscribePending = false;
            for (const update of frame.statuses)
                this.deliver(update);
            return;
        }
        const update = frame;
        if (this.subscribePending &&
            update.status === "rejected" &&
            !update.command_id &&
            update.error?.code === "invalid_command") {
            this.subscribePending = false; // a gateway that does not know `subscribe` yet
            return;
        }
        if (typeof update.status === "string")
            this.deliver(update);
    }
    deliver(update) {
        const id = update.command_id;
        // Every command seen is followed, so repeats (live and re-read) are dropped once.
        const handle = id ? this.track(id) : undefined;
        if (handle !== undefined && !handle.add(update))
            return;
        for (const listener of this.statusListeners)
            listener(update);
    }
    emitConnection(event) {
        this.state = event.state === "reconnecting" ? "reconnecting" : event.state;
        for (const listener of this.connectionListeners)
            listener(event);
    }
}
