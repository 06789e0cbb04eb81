// The client against a real gateway, edge agent and simulated BMS, started by
// tests/client/test_typed_client.py (DISPATCH_URL, DISPATCH_TOKEN, DISPATCH_EDGE).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { DispatchClient, GatewayError, checkChannelValue, newCommandId, parseDecimal } from "../../gateway/static/client/index.js";

const URL_ = process.env.DISPATCH_URL;
const TOKEN = process.env.DISPATCH_TOKEN;
const EDGE = process.env.DISPATCH_EDGE ?? "site1_edge_prod";
const live = URL_ && TOKEN ? {} : { skip: "DISPATCH_URL and DISPATCH_TOKEN are not set" };

function setpoint(value, extra = {}) {
  return {
    command_id: newCommandId("node"),
    command_type: "setpoint",
    target: { edge_id: EDGE, device_id: "bms_main", channel: "SetActivePower" },
    value,
    unit: "W",
    expiry_sec: 300,
    source: "node_client",
    timestamp: new Date().toISOString(),
    ...extra,
  };
}

async function statusesOf(handle) {
  const seen = [];
  for await (const update of handle) seen.push(update.status);
  return seen;
}

let client;
before(async () => {
  if (!URL_) return;
  client = new DispatchClient({ baseUrl: URL_, token: TOKEN });
  await client.connect();
});
after(() => client?.close());

test("send gives the lifecycle as it happens, up to executed", live, async () => {
  const handle = client.send(setpoint(42000));
  assert.deepEqual(await statusesOf(handle), ["issued", "authorized", "routed", "delivered", "executed"]);
  assert.equal((await handle.done).status, "executed");
  const view = await client.rest.command(handle.commandId);
  assert.equal(view.status, "executed");
  assert.equal(view.command.value, 42000);
});

test("a value the edge refuses ends rejected with the edge's reason", live, async () => {
  const handle = client.send(setpoint(250000));
  const final = await handle.done;
  assert.equal(final.status, "rejected");
  assert.equal(final.error.code, "out_of_range");
  assert.match(final.error.message, /250000/);
});

test("a schema violation is answered with rejected and the field", live, async () => {
  const handle = client.send(setpoint("fifty"));
  const final = await handle.done;
  assert.equal(final.status, "rejected");
  assert.equal(final.error.code, "invalid_command");
});

test("cancel answers why not for an executed and an unknown command", live, async () => {
  const handle = client.send(setpoint(1000));
  await handle.done;
  const late = await client.cancel(handle.commandId);
  assert.equal(late.error.code, "not_cancellable");
  const unknown = await client.cancel("node_no_such_command");
  assert.equal(unknown.status, "rejected");
  assert.equal(unknown.error.code, "unknown_command");
});

test("after the socket drops it reconnects by itself and re-reads tracked commands", live, async () => {
  const handle = client.send(setpoint(2000));
  await handle.done;
  const tracked = client.track(newCommandId("node_unsent")); // never sent: not in the ledger
  const states = [];
  const off = client.onConnection((e) => states.push(e.state));
  const resynced = new Promise((resolve) => {
    const stop = client.onResync((ids) => { stop(); resolve(ids); });
  });
  client["socket"].close(4000, "simulated network loss");
  await resynced;
  off();
  assert.ok(states.includes("reconnecting") && states.includes("open"), states.join(","));
  assert.equal(client.state, "open");
  assert.equal(tracked.current, undefined);
  const again = client.send(setpoint(3000));
  assert.equal((await again.done).status, "executed");
});

test("history, edges and capabilities are readable with the same token", live, async () => {
  const handle = client.send(setpoint(4000));
  await handle.done;
  let rows = [];
  for (let i = 0; i < 100 && !rows.some((r) => r.command_id === handle.commandId && r.status === "executed"); i++) {
    rows = (await client.rest.history({ edge_id: EDGE, limit: 100 })).rows;
    if (!rows.some((r) => r.command_id === handle.commandId)) await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(rows.some((r) => r.command_id === handle.commandId), "projected into the history");
  const csv = await client.rest.exportHistory({ edge_id: EDGE });
  assert.match(csv.split("\n")[0], /^command_id,/);
  assert.ok(csv.includes(handle.commandId));
  const refusals = await client.rest.rejections({ limit: 10 });
  assert.ok(Array.isArray(refusals.rows));
  const [edge] = await client.rest.edges();
  assert.equal(edge.edge_id, EDGE);
  assert.equal(edge.online, true);
  const config = await client.rest.capabilities(EDGE);
  assert.deepEqual(config.controllers.map((c) => c.name), ["peak_shaving", "balancing"]);
});

test("a bad token is refused with the gateway's reason", live, async () => {
  const stranger = new DispatchClient({ baseUrl: URL_, token: "not-a-jwt" });
  await assert.rejects(stranger.rest.me(), (err) => err instanceof GatewayError && err.status === 401);
});

test("form checks refuse empty, blank, hex and exponent input in plain words", () => {
  for (const text of ["", "   ", "0x10", "1e3", "12abc", "Infinity"]) {
    assert.equal(parseDecimal(text).ok, false, text);
  }
  assert.deepEqual(parseDecimal(" -12.5 "), { ok: true, value: -12.5 });
  const power = { name: "SetActivePower", data_type: "int32", unit: "W", access: "read_write", min: -100000, max: 100000 };
  assert.deepEqual(checkChannelValue("50", power, "kW"), { ok: true, value: 50000 });
  assert.match(checkChannelValue("100.5", power, "kW").message, /Out of range/);
  assert.match(checkChannelValue("0.0005", power, "kW").message, /steps of 1 W/);
});

test("the current status never steps back; a late result replaces timed_out", async () => {
  const { CommandHandle } = await import("../../gateway/static/client/index.js");
  const handle = new CommandHandle("c1");
  const at = (s) => `2026-02-15T14:30:${s}Z`;
  handle.add({ command_id: "c1", status: "routed", at: at("00.100") });
  handle.add({ command_id: "c1", status: "timed_out", at: at("10.100") });
  handle.add({ command_id: "c1", status: "delivered", at: at("00.050") }); // arrives late
  assert.equal(handle.current.status, "timed_out");
  handle.add({ command_id: "c1", status: "executed", at: at("11.000"), late: true });
  assert.equal(handle.current.status, "executed");
  assert.equal(handle.add({ command_id: "c1", status: "executed", at: at("11.000") }), false);
  assert.deepEqual(handle.updates.map((u) => u.status), ["delivered", "routed", "timed_out", "executed"]);
});
