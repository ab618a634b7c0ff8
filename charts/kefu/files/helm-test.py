"""helm test: one message through the whole release, as a visitor would send it.

Waits for the gateway's /readyz, puts a document with a fact nobody else has, starts a conversation,
asks about the fact and checks that the answer states it and cites the document, reads the
conversation back, then deletes the document. Standard library only: it runs in the gateway image.
Environment: KEFU_URL (the gateway), KEFU_ADMIN_TOKEN, KEFU_TEST_TENANT, KEFU_TEST_TIMEOUT (seconds).
"""

import json
import os
import random
import sys
import time
import urllib.error
import urllib.request

BASE = os.environ["KEFU_URL"].rstrip("/")
ADMIN = os.environ["KEFU_ADMIN_TOKEN"]
TENANT = os.environ.get("KEFU_TEST_TENANT", "helm-test")
DEADLINE = time.monotonic() + float(os.environ.get("KEFU_TEST_TIMEOUT", "300"))


class Failed(Exception):
    pass


def call(method, path, body=None, token=None, ok=(200, 201)):
    """One JSON call; 429 and 503 are waited out (Retry-After) until the deadline."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body).encode()
    while True:
        req = urllib.request.Request(BASE + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=max(5.0, DEADLINE - time.monotonic())) as resp:
                status, text, retry = resp.status, resp.read().decode(), None
        except urllib.error.HTTPError as exc:
            status, text, retry = exc.code, exc.read().decode(errors="replace"), exc.headers.get("Retry-After")
        except (urllib.error.URLError, OSError) as exc:
            status, text, retry = 0, str(exc), None
        if status in ok:
            return json.loads(text) if text else {}
        if status in (0, 429, 503) and time.monotonic() + 2 < DEADLINE:
            time.sleep(min(10.0, float(retry or 2)))
            continue
        raise Failed(f"{method} {path}: HTTP {status}: {text[:500]}")


def main():
    print(f"waiting for {BASE}/readyz", flush=True)
    call("GET", "/readyz")
    code = f"HT-{random.randint(1000, 9999)}"
    price = random.randint(101, 999)
    doc_id = f"helm-test-{code.lower()}"
    doc = {"title": f"{code} test lamp",
           "text": f"The {code} test lamp costs {price} yuan. It is sold only to check this installation."}
    call("PUT", f"/v1/tenants/{TENANT}/documents/{doc_id}", doc, token=ADMIN)
    try:
        conv = call("POST", f"/v1/tenants/{TENANT}/conversations", {"visitor_id": "helm-test"})
        cid, visitor = conv["conversation_id"], conv["visitor_token"]
        answer = call("POST", f"/v1/conversations/{cid}/messages",
                      {"text": f"How much is the {code} test lamp?", "client_msg_id": doc_id}, token=visitor)
        reply = answer["reply"]
        print("reply:", json.dumps(reply, ensure_ascii=False), flush=True)
        if str(price) not in reply["text"] or doc_id not in reply.get("citations", []):
            raise Failed(f"the answer should state {price} and cite {doc_id}: {reply}")
        state = call("GET", f"/v1/conversations/{cid}", token=visitor)
        texts = [turn.get("text", "") for turn in state.get("turns", [])]
        if not any(code in t for t in texts) or not any(str(price) in t for t in texts):
            raise Failed(f"the conversation read back lacks the question or the answer: {texts}")
    finally:
        call("DELETE", f"/v1/tenants/{TENANT}/documents/{doc_id}", token=ADMIN)
    print(f"ok: conversation {cid}, answer seq {answer['seq']} from {reply['source']}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failed as exc:
        print(f"helm test failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (KeyError, ValueError) as exc:  # an answer without the fields of the contract
        print(f"helm test failed: unexpected answer: {exc!r}", file=sys.stderr, flush=True)
        sys.exit(1)
