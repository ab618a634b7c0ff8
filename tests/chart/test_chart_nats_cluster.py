"""charts/kefu's own NATS as a JetStream cluster (nats.embedded.cluster), rendered with the real helm: three
servers routed through the headless Service, KEFU_STREAM_REPLICAS=3 on every service, a PDB that lets one
server go at a time, the route port open between the servers only; and the fsync setting."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kefu.shared.natsserver import find_nats_server
from kefu.shared.testing import load_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kefu"
HELM = ROOT / ".tools" / "helm" / "helm"
CLUSTER_VALUES = CHART / "ci" / "nats-cluster-values.yaml"
SERVICES = ("gateway", "dialogue", "retrieval", "inference", "plugins")

pytestmark = pytest.mark.chart


chart_lint = load_tool(ROOT / "tools" / "chart_lint.py", "chart_lint_cluster")


def render(*sets: str, values: Path | None = None) -> list[dict[str, Any]]:
    assert HELM.exists(), f"{HELM} is missing: `make .tools/helm/helm` (make test does it)"
    return chart_lint.render(str(HELM), values, *[a for s in sets for a in ("--set", s)], chart=CHART,
                             release="kefu")


def of(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def env(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def nats_conf(objs: list[dict[str, Any]]) -> str:
    return of(objs, "ConfigMap")["kefu-nats-config"]["data"]["nats.conf"]


def test_the_cluster_values_make_three_routed_servers_and_three_replicas():
    objs = render(values=CLUSTER_VALUES)
    sts = of(objs, "StatefulSet")["kefu-nats"]
    assert sts["spec"]["replicas"] == 3
    conf = nats_conf(objs)
    for i in range(3):
        assert f"nats://kefu-nats-{i}.kefu-nats-headless.kefu.svc:6222" in conf
    assert "cluster {" in conf and "server_name: $SERVER_NAME" in conf
    ports = {p["name"] for p in of(objs, "Service")["kefu-nats-headless"]["spec"]["ports"]}
    assert "cluster" in ports
    deployments = of(objs, "Deployment")
    for service in SERVICES:
        assert env(deployments[f"kefu-{service}"])["KEFU_STREAM_REPLICAS"] == "3", service
    pdb = of(objs, "PodDisruptionBudget")["kefu-nats"]
    assert pdb["spec"]["maxUnavailable"] == 1
    policy = of(objs, "NetworkPolicy")["kefu-nats"]
    route_rules = [r for r in policy["spec"]["ingress"] if {"port": "cluster", "protocol": "TCP"} in r["ports"]]
    assert route_rules and route_rules[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"


def test_one_server_by_default_with_one_replica_and_fsync_always():
    objs = render()
    assert of(objs, "StatefulSet")["kefu-nats"]["spec"]["replicas"] == 1
    assert "kefu-nats" not in of(objs, "PodDisruptionBudget")
    conf = nats_conf(objs)
    assert "cluster {" not in conf
    assert yaml.safe_load('x: ' + conf.split("sync_interval:")[1].splitlines()[0].strip())["x"] == "always"
    for service in SERVICES:
        assert env(of(objs, "Deployment")[f"kefu-{service}"])["KEFU_STREAM_REPLICAS"] == "1"
    assert "sync_interval" not in nats_conf(render("nats.embedded.jetstream.syncInterval="))


def test_an_external_cluster_gets_the_replicas_asked_for():
    objs = render("nats.url=nats://nats.messaging:4222", "streamReplicas=3")
    assert "kefu-nats" not in of(objs, "StatefulSet")
    for service in SERVICES:
        assert env(of(objs, "Deployment")[f"kefu-{service}"])["KEFU_STREAM_REPLICAS"] == "3"


@pytest.mark.parametrize("values", [CLUSTER_VALUES, None])
def test_the_rendered_nats_conf_is_one_nats_server_accepts(values, tmp_path):
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_conf(render(values=values)).replace("/data", str(tmp_path / "data"))
                    .replace("/tmp/nats.pid", str(tmp_path / "nats.pid")))
    out = subprocess.run([find_nats_server(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SERVER_NAME": "kefu-nats-0"})
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr
