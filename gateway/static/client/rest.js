/** A 4xx/5xx answer of the gateway, with its machine code and human message. */
export class GatewayError extends Error {
    status;
    code;
    constructor(status, code, message) {
        super(message);
        this.status = status;
        this.code = code;
        this.name = "GatewayError";
    }
}
function query(params) {
    const q = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
        if (value !== undefined && value !== null && value !== "")
            q.set(key, String(value));
    }
    const text = q.toString();
    return text ? `?${text}` : "";
}
export class Rest {
    baseUrl;
    token;
    fetchImpl;
    constructor(baseUrl, token, fetchImpl) {
        this.baseUrl = baseUrl;
        this.token = token;
        this.fetchImpl = fetchImpl;
    }
    async request(method, path) {
        const response = await this.fetchImpl(this.baseUrl + path, {
            method,
            headers: { Authorization: `Bearer ${this.token()}` },
            cache: "no-store",
        });
        if (!response.ok) {
            let code = "http_" + response.status;
            let message = `${method} ${path} answered ${response.status}`;
            try {
                const body = (await response.json());
                code = body.error?.code ?? code;
                message = body.error?.message ?? message;
            }
            catch {
                // not JSON: keep the generic words
            }
            throw new GatewayError(response.status, code, message);
        }
        return response;
    }
    async json(method, path) {
        return (await (await this.request(method, path)).json());
    }
    me() {
        return this.json("GET", "/api/me");
    }
    async edges() {
        return (await this.json("GET", "/api/edges")).edges;
    }
    capabilities(edgeId) {
        return this.json("GET", `/api/edges/${encodeURIComponent(edgeId)}/capabilities`);
    }
    command(commandId) {
        return this.json("GET", `/api/commands/${encodeURIComponent(commandId)}`);
    }
    /** The gateway's answer to a cancel: `cancelled`, or why not (`not_cancellable`...). */
    async cancel(commandId) {
        const response = await this.fetchImpl(`${this.baseUrl}/api/commands/${encodeURIComponent(commandId)}/cancel`, { method: "POST", headers: { Authorization: `Bearer ${this.token()}` } });
        // Every answer (cancelled, not_cancellable, unknown_command...) is a status update.
        return (await response.json());
    }
    async history(params = {}) {
        const body = await this.json("GET", "/api/commands" + query(params));
        return { rows: body.commands, next_cursor: body.next_cursor };
    }
    async rejections(params = {}) {
        const body = await this.json("GET", "/api/rejections" + query(params));
        return { rows: body.rejections, next_cursor: body.next_cursor };
    }
    /** Every matching history row as CSV text (the gateway streams the export). */
    async exportHistory(params = {}) {
        const response = await this.request("GET", "/api/commands" + query({ ...params, format: "csv" }));
        return response.text();
    }
}
