#!/usr/bin/env python3
"""Admin API clients for benches/run.sh (scenarios 14-16): keep-alive HTTP, a monotonic clock.

  admin.py revoke  WRITER READER TOKEN TRIALS KEY_NAME_PREFIX URI
      Scenario 14. Per trial: create a key for user1-client on WRITER's admin port, call /auth with
      it on READER until 200 (warm), revoke it on WRITER, and call /auth on READER as fast as one
      connection can until 401. Prints one line per trial: the milliseconds from sending the DELETE
      to the first 401 (or "timeout" after 5 s), and how many 200s came after the DELETE's answer.
  admin.py writes  ADMIN_PORT TOKEN RATE [COUNT]
      Scenario 15. PUTs of the operator consumer bench-operator, its content alternating, RATE a
      second, until COUNT writes or SIGTERM. Prints "writes failed seconds".
  admin.py reloads ADMIN_PORT TOKEN [COUNT]
      Scenario 16. POST /admin/reload back to back until COUNT reloads or SIGTERM (the reload in
      flight is finished first). Prints one line per reload: milliseconds and the answer's result,
      then "reloads failed".

WRITER, READER: "ADMIN_PORT:SERVICE_PORT". Only the standard library.
"""

import http.client
import json
import signal
import sys
import time

stopping = False


def stop(_signum, _frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)


class Client:
    """One keep-alive connection, opened again when the server closes it."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def call(self, method, path, headers=None, body=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def admin_headers(token):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def revoke(writer, reader, token, trials, prefix, uri):
    admin_port, _ = writer.split(":")
    _, auth_port = reader.split(":")
    admin, auth = Client(int(admin_port)), Client(int(auth_port))
    for trial in range(int(trials)):
        status, body = admin.call("POST", "/admin/consumers/user1-client/keys", admin_headers(token),
                                  json.dumps({"name": f"{prefix}-{trial}"}))
        if status != 201:
            sys.exit(f"trial {trial}: creating a key answered {status}: {body[:200]!r}")
        created = json.loads(body)
        headers = {"apikey": created["key"], "X-Forwarded-Uri": uri}
        deadline = time.monotonic() + 5
        while auth.call("GET", "/auth", headers)[0] != 200:
            if time.monotonic() > deadline:
                sys.exit(f"trial {trial}: the new key is not allowed on the reader after 5 s")
        auth.call("GET", "/auth", headers)  # served from the reader's cache now
        started = time.monotonic()
        status, body = admin.call("DELETE", f"/admin/consumers/user1-client/keys/{created['id']}",
                                  admin_headers(token))
        if status != 200:
            sys.exit(f"trial {trial}: revoking answered {status}: {body[:200]!r}")
        stale = 0  # 200s after the DELETE was answered
        while True:
            status = auth.call("GET", "/auth", headers)[0]
            now = time.monotonic()
            if status == 401:
                print(f"{(now - started) * 1000:.2f} {stale}", flush=True)
                break
            if now - started > 5:
                print(f"timeout {stale}", flush=True)
                break
            stale += 1


def writes(port, token, rate, count=None):
    admin = Client(int(port))
    interval = 1 / float(rate)
    done = failed = 0
    started = next_at = time.monotonic()
    entry = {"id": "op-entry", "provider_name": "op",
             "tdl_matrix": {f"T{t}": [0] for t in range(1, 13)}, "capabilities": [1, 1, 0, 0, 0],
             "max_input_tokens": 50000, "max_output_tokens": 20000,
             "input_cost_per_token": 0.00000005, "output_cost_per_token": 0.0000002}
    while not stopping and (count is None or done < int(count)):
        body = json.dumps({"custom_id": f"op-{done % 2}", "tags": [f"round-{done % 2}"],
                           "acls": [{"group": "op-group"}], "metadata_list": [entry]})
        status, _ = admin.call("PUT", "/admin/consumers/bench-operator", admin_headers(token), body)
        done += 1
        failed += status not in (200, 201)
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(done, failed, f"{time.monotonic() - started:.3f}")


def reloads(port, token, count=None):
    admin = Client(int(port))
    done = failed = 0
    while not stopping and (count is None or done < int(count)):
        started = time.monotonic()
        status, body = admin.call("POST", "/admin/reload", admin_headers(token))
        took = (time.monotonic() - started) * 1000
        try:
            result = json.loads(body).get("result", "?")
        except ValueError:
            result = "?"
        done += 1
        if status != 200 or result != "ok":
            failed += 1
            result = f"{status}:{result}"
        print(f"{took:.0f} {result}", flush=True)
    print(done, failed)


if __name__ == "__main__":
    commands = {"revoke": revoke, "writes": writes, "reloads": reloads}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
