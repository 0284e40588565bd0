"""Counts how a running local stack answers batch-gets of a few sizes: the
reproduction behind docs/LOCAL_STACK.md ("The function host's dropped
answers"). Stores 180 results of 25 KB once, then sends batch-gets of 4, 10,
40 and 180 of them (answers of about 100 KB, 250 KB, 1 MB and 4.5 MB), one
after another and 4 at a time, each once, with a 10 s time-out, and prints
per size: answered whole, the host's own 500, other statuses, no answer.

    python tools/cargo-lambda/repro.py [--endpoint URL] [--rounds N]
"""

import argparse
import collections
import concurrent.futures
import json
import secrets
import urllib.error
import urllib.request


def call(method, url, body, timeout):
    request = urllib.request.Request(url, data=body.encode(), method=method)
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def outcome(endpoint, ids, value):
    try:
        status, body = call("POST", f"{endpoint}/v1/tasks/batch-get", json.dumps({"task_ids": ids}), 10)
    except (TimeoutError, OSError) as e:
        return f"no answer ({type(e).__name__})"
    if status == 500 and b"httpstatuses.com/500" in body:
        return "the host's own 500"
    if status != 200:
        return f"status {status}"
    results = json.loads(body)["results"]
    whole = len(results) == len(ids) and all(r.get("result") == value for r in results)
    return "answered whole" if whole else "answered, not whole"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", default="http://127.0.0.1:9000")
    parser.add_argument("--rounds", type=int, default=25)
    a = parser.parse_args()
    value = secrets.token_hex(12_500)
    ids = [f"repro-{secrets.token_hex(6)}-{i}" for i in range(180)]
    body = json.dumps({"status": "SUCCESS", "result": value})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(s == 200 for s, _ in pool.map(lambda i: call("PUT", f"{a.endpoint}/v1/tasks/{i}", body, 30), ids))
    for n in (4, 10, 40, 180):
        serial = collections.Counter(outcome(a.endpoint, ids[:n], value) for _ in range(a.rounds))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = collections.Counter(
                pool.map(lambda _, n=n: outcome(a.endpoint, ids[:n], value), range(a.rounds))
            )
        print(f"{n:>3} results, serial: {dict(serial)}; 4 at a time: {dict(together)}")


if __name__ == "__main__":
    main()
