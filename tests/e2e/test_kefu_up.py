"""A new user's path: `kefu up` on free ports, documents in, a cited streamed answer out, the CLI
commands, a crashed service restarted, plugins reloaded on SIGHUP, and Ctrl-C leaving no process behind."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kefu.shared.natsserver import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.model]

ADMIN = "e2e-admin-token-0123456789"
KEFU = str(Path(sys.executable).parent / "kefu")


def http(base, method, path, body=None, token=None, accept=None, timeout=120):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if accept:
        headers["Accept"] = accept
    data = json.dumps(body, ensure_ascii=False).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def group_alive(pgid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-g", str(pgid), "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture
def kefu_up(tmp_path, models_data_dir):
    http_port, grpc_port = free_port(), free_port()
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_data_dir / "models")
    env = dict(os.environ, KEFU_ADMIN_TOKEN=ADMIN, KEFU_LOG_LEVEL="info")
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([KEFU, "up", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--data-dir", str(data)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.time() + 240
    while http(base, "GET", "/readyz", timeout=3)[0] != 200 or "admin token" not in (tmp_path / "up.log").read_text():
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        assert time.time() < deadline, "not ready: " + (tmp_path / "up.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"base": base, "proc": proc, "data": data, "log": tmp_path / "up.log"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_first_answer_cli_restart_and_clean_stop(kefu_up, tmp_path):
    base, proc, data = kefu_up["base"], kefu_up["proc"], kefu_up["data"]
    out = kefu_up["log"].read_text()
    assert base in out and f"admin token: {ADMIN}" in out

    # Knowledge in through the CLI importer (jsonl and markdown), read back by search.
    (tmp_path / "faq.jsonl").write_text(json.dumps({"doc_id": "lamp-price", "title": "Desk lamp L2",
                                                    "text": "The L2 desk lamp costs 129 yuan."}) + "\n")
    (tmp_path / "warranty.md").write_text("# Warranty\nEvery L2 lamp has a 24 month warranty.\n")
    imp = subprocess.run([KEFU, "kb", "import", str(tmp_path / "faq.jsonl"), str(tmp_path / "warranty.md"),
                          "--tenant", "shop", "--data-dir", str(data)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KEFU_ADMIN_TOKEN=ADMIN))
    assert imp.returncode == 0, imp.stdout + imp.stderr
    assert "2 documents imported" in imp.stdout

    st, body = http(base, "POST", "/v1/tenants/shop/conversations", {"visitor_id": "e2e"})
    assert st == 201
    conv = json.loads(body)
    st, body = http(base, "POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                    {"text": "How much is the L2 desk lamp?"}, token=conv["visitor_token"], accept="text/event-stream")
    assert st == 200
    events = [line for line in body.splitlines() if line.startswith("event:")]
    assert events[0] == "event: delta" and events[-1] == "event: done"
    done = json.loads(body.strip().splitlines()[-1][len("data:"):])
    assert "129" in done["reply"]["text"] and done["reply"]["citations"] == ["lamp-price"]

    replay = subprocess.run([KEFU, "replay", conv["conversation_id"], "--at-seq", "1", "--data-dir", str(data)],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, KEFU_ADMIN_TOKEN=ADMIN))
    assert replay.returncode == 0, replay.stderr
    state = json.loads(replay.stdout)
    assert [t["text"] for t in state["turns"]] == ["How much is the L2 desk lamp?"]

    check_metrics_and_logs(data, done["reply"]["source"])

    # A service that dies is reported and restarted; the conversation survives in JetStream.
    dialogue = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "kefu.dialogue"], capture_output=True,
                              text=True).stdout.split()
    assert len(dialogue) == 1
    os.kill(int(dialogue[0]), signal.SIGKILL)
    deadline = time.time() + 240
    while "dialogue exited with code -9; restarting" not in kefu_up["log"].read_text():
        assert time.time() < deadline
        time.sleep(0.5)
    while True:
        st, body = http(base, "POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                        {"text": "How much is the L2 desk lamp?"}, token=conv["visitor_token"], timeout=120)
        if st == 200:
            break
        assert time.time() < deadline, body
        time.sleep(1)
    assert json.loads(body)["seq"] == 3

    # The built-in plugins are in <data-dir>/plugins; an edited one is served after a SIGHUP to kefu up.
    plugin = data / "plugins" / "ai_enhancer.py"
    plugin.write_text(plugin.read_text().replace('"version": "1.0.0"', '"version": "1.0.1"'))
    proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 60
    while True:
        st, body = http(base, "GET", "/v1/tenants/shop/plugins", token=ADMIN)
        versions = {p["name"]: p["version"] for p in json.loads(body)["plugins"]} if st == 200 else {}
        if versions.get("ai_enhancer") == "1.0.1":
            break
        assert time.time() < deadline, (st, body)
        time.sleep(0.3)
    assert set(versions) == {"ai_enhancer", "crm_adapter", "payment"}

    # Ctrl-C stops everything, nats-server included.
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0
    deadline = time.time() + 10
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert group_alive(proc.pid) == []
    assert not (data / "runtime.json").exists()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def check_metrics_and_logs(data: Path, source: str) -> None:
    """Each service's own /metrics (its port in runtime.json) moved with the documents and the turn; every
    log line is JSON and none holds the visitor's words."""
    urls = json.loads((data / "runtime.json").read_text())["metrics"]
    assert set(urls) == {"gateway", "dialogue", "retrieval", "inference", "plugins"}
    assert len({u.rsplit(":", 1)[1] for u in urls.values()}) == 5
    for url in urls.values():
        assert http(url.removesuffix("/metrics"), "GET", "/healthz")[0] == 200

    deadline = time.time() + 60
    while True:  # the model's job may finish after the reply (the cited sentence answers meanwhile)
        got = {name: scrape(url) for name, url in urls.items()}
        if got["inference"].get(("kefu_llm_generation_seconds_count", ()), 0) >= 1 or time.time() > deadline:
            break
        time.sleep(0.5)
    dialogue, inference, retrieval, gateway, plugins = (got[n] for n in ("dialogue", "inference", "retrieval",
                                                                         "gateway", "plugins"))
    assert dialogue[("kefu_turn_duration_seconds_count", (("source", source),))] == 1
    assert 0 < dialogue[("kefu_turn_duration_seconds_sum", (("source", source),))] < 120
    assert inference[("kefu_llm_generation_seconds_count", ())] >= 1
    assert inference[("kefu_llm_tokens_total", ())] >= 1
    assert inference[("kefu_llm_time_to_first_token_seconds_count", ())] >= 1
    assert inference[("kefu_llm_queue_depth", ())] == 0
    assert retrieval[("kefu_kb_freshness_lag_seconds_count", ())] == 2  # the two documents imported
    assert gateway[("kefu_http_requests_total", (("route", "/v1/conversations/{cid}/messages"),
                                                 ("status", "200")))] == 1
    assert gateway[("kefu_http_requests_total", (("route", "/v1/tenants/{tenant}/conversations"),
                                                 ("status", "201")))] == 1
    assert gateway[("kefu_ws_connections", ())] == 0
    assert plugins[("kefu_plugin_calls_total", (("outcome", "ok"), ("plugin", "ai_enhancer"),
                                                ("tool", "hook:on_message")))] == 1
    # Each process shows its own metrics only, and the process metrics.
    assert not any(name.startswith("kefu_llm") for name, _ in gateway)
    assert all(("process_resident_memory_bytes", ()) in m for m in got.values())

    # An error the gateway answers is counted by its code.
    st, body = http(json.loads((data / "runtime.json").read_text())["http_url"], "GET", "/v1/conversations/nope",
                    token="bad")
    assert st == 401
    code = json.loads(body)["error"]["code"]
    assert scrape(urls["gateway"])[("kefu_errors_total", (("code", code), ("service", "gateway")))] == 1

    for name in urls:
        lines = (data / "logs" / f"{name}.log").read_text().splitlines()
        assert lines
        for line in lines:
            event = json.loads(line)  # every line: not one in another format
            assert "L2 desk lamp" not in line or event["level"] == "debug", (name, line)


def test_killed_supervisor_leaves_no_orphans(kefu_up):
    proc = kefu_up["proc"]
    assert len(group_alive(proc.pid)) >= 6  # kefu up, nats-server, five services
    proc.send_signal(signal.SIGKILL)  # only the supervisor: the children must notice by themselves
    proc.wait()
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.3)
    assert group_alive(proc.pid) == []


def test_metrics_ports_of_the_children():
    from kefu.cli.up import metrics_ports

    names = ["gateway", "dialogue", "retrieval"]
    assert metrics_ports(names, "9100") == {"gateway": 9100, "dialogue": 9101, "retrieval": 9102}
    assert metrics_ports(names, "off") == {}
    free = metrics_ports(names, "")
    assert set(free) == set(names) and len(set(free.values())) == 3
    for bad in ("nine", "65534", "-1"):
        with pytest.raises(ValueError, match="KEFU_METRICS_PORT"):
            metrics_ports(names, bad)


def test_ready_timeout_setting():
    from kefu.cli.up import READY_TIMEOUT, ready_timeout

    assert ready_timeout("") == READY_TIMEOUT and ready_timeout("1800") == 1800.0
    for bad in ("soon", "0", "-5", "nan", "1e9"):
        with pytest.raises(ValueError, match="KEFU_READY_TIMEOUT"):
            ready_timeout(bad)
