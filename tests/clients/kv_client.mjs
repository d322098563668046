// kv with ioredis's defaults (RESP2, INFO ready check): connect, SET/GET, a
// pipeline, a transaction, SCAN over 10,000 keys, and a subscriber that
// must receive 1,000 messages in order, exactly once, while the test
// moves the service. Usage: node kv_client.mjs HOST PORT. Prints
// "subscribed" when ready, reads "moves done" on stdin before the last
// 100 messages, prints one JSON line at the end; exits 1 on any mismatch.
import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import Redis from "ioredis";

const MESSAGES = 1000;
const HOLD_BACK = 100;
const [host, port] = [process.argv[2], Number(process.argv[3])];
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

const r = new Redis({ host, port });
const sub = new Redis({ host, port });
let reconnects = 0;
for (const c of [r, sub]) c.on("reconnecting", () => reconnects++);

try {
  assert.equal(await r.ping(), "PONG");
  assert.equal(await r.set("greeting", "hello"), "OK");
  assert.equal(await r.get("greeting"), "hello");

  const p = r.pipeline();
  for (let i = 0; i < 100; i++) p.set(`p:${i}`, i);
  p.incr("p:7").get("p:7");
  const res = (await p.exec()).map(([err, v]) => (assert.equal(err, null), v));
  assert.deepEqual(res, [...Array(100).fill("OK"), 8, "8"]);

  await r.del("tx");
  const tx = await r.multi().incr("tx").incr("tx").get("tx").exec();
  assert.deepEqual(tx, [[null, 1], [null, 2], [null, "2"]]);

  for (let start = 0; start < 10000; start += 1000) {
    const q = r.pipeline();
    for (let i = start; i < start + 1000; i++) q.set(`scan:${i}`, i);
    await q.exec();
  }
  const found = new Set();
  let cursor = "0";
  do {
    const [next, keys] = await r.scan(cursor, "MATCH", "scan:*");
    keys.forEach((k) => found.add(k));
    cursor = next;
  } while (cursor !== "0");
  assert.equal(found.size, 10000);

  const got = [];
  sub.on("message", (channel, message) => {
    if (channel === "news") got.push(message);
  });
  assert.equal(await sub.subscribe("news"), 1);
  console.log("subscribed");
  for (let i = 0; i < MESSAGES; i++) {
    if (i === MESSAGES - HOLD_BACK) {
      const { value } = await lines.next();
      assert.equal(value?.trim(), "moves done");
    }
    assert.equal(await r.publish("news", String(i)), 1, `message ${i}`);
    await sleep(3);
  }
  console.log("published");
  const deadline = Date.now() + 60000;
  while (got.length < MESSAGES && Date.now() < deadline) await sleep(20);
  await sleep(500);
  const want = Array.from({ length: MESSAGES }, (_, i) => String(i));
  const ok = JSON.stringify(got) === JSON.stringify(want) && reconnects === 0;
  console.log(JSON.stringify({ ok, received: got.length, reconnects, scanned: found.size }));
  process.exitCode = ok ? 0 : 1;
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e?.stack ?? e) }));
  process.exitCode = 1;
} finally {
  r.disconnect();
  sub.disconnect();
  process.stdin.destroy();
}
