"""kv with redis-py's defaults (RESP3 via HELLO 3): connect, SET/GET, a
pipeline, a transaction (and a WATCH abort), SCAN over 10,000 keys, and a
subscriber that must receive 1,000 messages in order, exactly once, while
the test moves the service. Usage: kv_client.py HOST PORT. Prints
"subscribed" when the subscriber is ready, reads "moves done" on stdin
before the last 100 messages, prints one JSON line at the end; exits 1 on
any mismatch."""

import json
import sys
import threading
import time

import redis

MESSAGES = 1000
HOLD_BACK = 100  # published only after the moves are done


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    r = redis.Redis(host=host, port=port)
    assert r.ping() is True
    assert r.set("greeting", "hello") is True
    assert r.get("greeting") == b"hello"

    p = r.pipeline(transaction=False)
    for i in range(100):
        p.set(f"p:{i}", i)
    p.incr("p:7")
    p.get("p:7")
    res = p.execute()
    assert res == [True] * 100 + [8, b"8"], res

    r.delete("tx")
    p = r.pipeline()
    p.incr("tx")
    p.incr("tx")
    p.get("tx")
    assert p.execute() == [1, 2, b"2"]
    with r.pipeline() as p:
        p.watch("watched")
        r.set("watched", "by another connection")
        p.multi()
        p.set("watched", "mine")
        try:
            p.execute()
            raise AssertionError("EXEC succeeded despite a modified WATCH key")
        except redis.WatchError:
            pass
    assert r.get("watched") == b"by another connection"

    for start in range(0, 10_000, 1000):
        p = r.pipeline(transaction=False)
        for i in range(start, start + 1000):
            p.set(f"scan:{i}", i)
        p.execute()
    found = list(r.scan_iter(match="scan:*"))
    assert len(found) == 10_000 and set(found) == {f"scan:{i}".encode() for i in range(10_000)}

    sub = r.pubsub()
    sub.subscribe("news")
    first = sub.get_message(timeout=5)
    assert first and first["type"] == "subscribe", first
    got = []
    deadline = time.monotonic() + 90

    def receive():
        while len(got) < MESSAGES and time.monotonic() < deadline:
            m = sub.get_message(timeout=1.0)
            if m and m["type"] == "message":
                got.append(m["data"].decode())

    receiver = threading.Thread(target=receive)
    receiver.start()
    print("subscribed", flush=True)
    for i in range(MESSAGES):
        if i == MESSAGES - HOLD_BACK:
            line = sys.stdin.readline()
            assert line.strip() == "moves done", line
        n = r.publish("news", str(i))
        assert n == 1, f"message {i} reached {n} subscribers"
        time.sleep(0.003)
    print("published", flush=True)
    receiver.join()
    extra = sub.get_message(timeout=0.5)
    want = [str(i) for i in range(MESSAGES)]
    if got != want or extra is not None:
        missing = sorted(set(want) - set(got), key=int)[:10]
        print(json.dumps({"ok": False, "received": len(got), "missing": missing,
                          "extra": str(extra)}), flush=True)
        sys.exit(1)
    print(json.dumps({"ok": True, "received": len(got), "scanned": len(found)}), flush=True)


main()
