"""charts/kefu rendered with the real helm (.tools/helm, `make test` fetches it): make chart-lint's checks,
and what each value does to the objects."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kefu.shared.testing import load_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kefu"
HELM = ROOT / ".tools" / "helm" / "helm"
SERVICES = ("gateway", "dialogue", "retrieval", "inference", "plugins")
# Those that seal or open conversation payloads, LLM jobs or media (kefu.shared.crypto's Keyring).
KEY_SERVICES = ("gateway", "dialogue", "inference", "plugins")

pytestmark = pytest.mark.chart


chart_lint = load_tool(ROOT / "tools" / "chart_lint.py", "chart_lint")


@pytest.fixture(scope="module", autouse=True)
def helm_binary() -> None:
    assert HELM.exists(), f"{HELM} is missing: `make .tools/helm/helm` (make test does it)"


def render(*sets: str, values: Path | None = None, release: str = "kefu", chart: Path = CHART) -> list[dict[str, Any]]:
    """helm template with --set pairs; fails the test with helm's message."""
    args = [a for s in sets for a in ("--set", s)]
    return chart_lint.render(str(HELM), values, *args, chart=chart, release=release)


def render_error(*sets: str) -> str:
    with pytest.raises(RuntimeError) as exc:
        render(*sets)
    return str(exc.value)


def objects(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(objs: list[dict[str, Any]], service: str, prefix: str = "kefu") -> dict[str, Any]:
    return objects(objs, "Deployment")[f"{prefix}-{service}"]["spec"]["template"]["spec"]["containers"][0]


def env(objs: list[dict[str, Any]], service: str, prefix: str = "kefu") -> dict[str, Any]:
    """name -> value (or valueFrom) of the service's container."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objs, service, prefix)["env"]}


def test_make_chart_lint_passes() -> None:
    """What `make chart-lint` runs: helm lint, helm template with every values file, the Kubernetes schemas."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "chart_lint.py"), "--helm", str(HELM)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no problem" in proc.stdout
    assert len(chart_lint.values_files()) >= 8


def test_lint_catches_a_broken_chart(tmp_path: Path) -> None:
    """The checks fail on what a chart author could get wrong, so a passing lint means something."""
    objs = render()
    dep = objects(objs, "Deployment")["kefu-dialogue"]
    broken = json.loads(json.dumps(objs))
    bdep = objects(broken, "Deployment")["kefu-dialogue"]
    bdep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    bdep["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "KEFU_LOG_LEVEL", "value": "debug"})
    bdep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "http"
    bdep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 3
    objects(broken, "Service")["kefu-retrieval"]["spec"]["selector"]["app.kubernetes.io/component"] = "retreival"
    objects(broken, "Deployment")["kefu-gateway"]["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "kefu-secrets", "key": "admin-tokn"}}})
    problems = chart_lint.schema_problems(broken) + chart_lint.consistency_problems(broken)
    text = "\n".join(problems)
    assert "readOnlyRootFilesystem" in text
    assert "KEFU_LOG_LEVEL set twice" in text
    assert "readinessProbe on port http" in text
    assert "periodSecond" in text  # the schema, strict: unknown fields are errors
    assert "Service/kefu-retrieval: selects no pod" in text
    assert "admin-tokn" in text
    assert dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert chart_lint.schema_problems(objs) == [] and chart_lint.consistency_problems(objs) == []


def test_defaults_render_five_services_nats_and_the_test_pod() -> None:
    objs = render()
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert {f"kefu-{s}" for s in SERVICES} <= set(objects(objs, kind)), kind
    assert not objects(objs, "HorizontalPodAutoscaler")  # autoscaling is opt-in
    nats = objects(objs, "StatefulSet")["kefu-nats"]
    assert nats["spec"]["template"]["spec"]["containers"][0]["image"].startswith("docker.io/nats:")
    assert nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    conf = objects(objs, "ConfigMap")["kefu-nats-config"]["data"]["nats.conf"]
    assert "jetstream {" in conf and "store_dir: /data" in conf
    assert objects(objs, "Service")["kefu-nats-headless"]["spec"]["clusterIP"] == "None"
    for service in SERVICES:
        assert env(objs, service)["KEFU_NATS_URL"] == "nats://kefu-nats:4222"
    test = objects(objs, "Pod")["kefu-test"]
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert {e["name"]: e.get("value") for e in test["spec"]["containers"][0]["env"]}["KEFU_URL"] == "http://kefu-gateway:8080"


def test_each_service_is_enabled_replicated_and_resourced_on_its_own() -> None:
    objs = render("plugins.enabled=false", "retrieval.replicas=5", "inference.resources.requests.cpu=7",
                  "dialogue.autoscaling.enabled=true", "dialogue.autoscaling.maxReplicas=9", "gateway.pdb.enabled=false",
                  "retrieval.pdb.minAvailable=1")
    deployments = objects(objs, "Deployment")
    assert "kefu-plugins" not in deployments and "kefu-plugins" not in objects(objs, "Service")
    assert "kefu-plugins" not in objects(objs, "PodDisruptionBudget")
    assert deployments["kefu-retrieval"]["spec"]["replicas"] == 5
    assert deployments["kefu-gateway"]["spec"]["replicas"] == 2
    assert container(objs, "inference")["resources"]["requests"]["cpu"] == 7
    assert container(objs, "dialogue")["resources"]["requests"]["cpu"] == "100m"
    hpas = objects(objs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"kefu-dialogue"} and hpas["kefu-dialogue"]["spec"]["maxReplicas"] == 9
    assert "replicas" not in deployments["kefu-dialogue"]["spec"]  # the HPA owns it
    pdbs = objects(objs, "PodDisruptionBudget")
    assert "kefu-gateway" not in pdbs
    assert pdbs["kefu-retrieval"]["spec"] == {"minAvailable": 1, "selector": pdbs["kefu-retrieval"]["spec"]["selector"]}
    assert pdbs["kefu-inference"]["spec"]["maxUnavailable"] == 1
    # The gateway's /readyz waits only for the services that run.
    assert env(objs, "gateway")["KEFU_READY_SERVICES"] == "dialogue,retrieval,inference"


def test_env_values_override_the_charts_and_accept_value_from() -> None:
    objs = render("common.env.KEFU_LOG_LEVEL=warning", "gateway.env.KEFU_LOG_LEVEL=debug",
                  "plugins.env.KEFU_PLUGINS_ALLOWED_HOSTS=crm.internal",
                  "plugins.env.KEFU_API.valueFrom.secretKeyRef.name=crm", "plugins.env.KEFU_API.valueFrom.secretKeyRef.key=k")
    assert env(objs, "gateway")["KEFU_LOG_LEVEL"] == "debug"
    assert env(objs, "dialogue")["KEFU_LOG_LEVEL"] == "warning"
    assert env(objs, "plugins")["KEFU_PLUGINS_ALLOWED_HOSTS"] == "crm.internal"
    assert env(objs, "plugins")["KEFU_API"] == {"secretKeyRef": {"name": "crm", "key": "k"}}
    names = [e["name"] for e in container(objs, "gateway")["env"]]
    assert len(names) == len(set(names))


def test_an_existing_nats_replaces_the_charts_own() -> None:
    objs = render("nats.url=nats://nats.messaging:4222")
    assert not objects(objs, "StatefulSet") and "kefu-nats" not in objects(objs, "Service")
    assert "kefu-nats" not in objects(objs, "NetworkPolicy")
    assert {env(objs, s)["KEFU_NATS_URL"] for s in SERVICES} == {"nats://nats.messaging:4222"}
    # A template names the release's own NATS (the charts/kefu-nats umbrella uses this).
    objs = render(values=CHART / "ci" / "subchart-values.yaml", release="support")
    assert env(objs, "dialogue", "support-kefu")["KEFU_NATS_URL"] == "nats://support-nats:4222"


def test_no_nats_at_all_is_refused_with_a_clear_message() -> None:
    assert "set nats.url to an existing cluster" in render_error("nats.embedded.enabled=false")


def test_values_that_are_wrong_are_refused_before_anything_is_rendered() -> None:
    assert "Additional property replica is not allowed" in render_error("gateway.replica=3")
    assert "inference.model.source" in render_error("inference.model.source=nfs")
    assert "encryption.crypto" in render_error("encryption.crypto=sm4")
    assert "inference.model.path is required" in render_error("inference.model.source=hostPath",
                                                              "inference.model.hostPath=/models")
    assert "existingClaim is required" in render_error("inference.model.source=existingClaim",
                                                       "inference.model.path=m.gguf")
    assert "base64 of 32 bytes" in render_error("encryption.masterKey=" + base64.b64encode(b"short").decode())
    assert "needs a target" in render_error("plugins.autoscaling.enabled=true",
                                            "plugins.autoscaling.targetCPUUtilizationPercentage=0")


def _secret_ref(value: Any) -> tuple[str, str]:
    return value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]


def test_secrets_reach_the_services_that_need_them() -> None:
    objs = render()
    secret = objects(objs, "Secret")["kefu-secrets"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(base64.b64decode(secret["data"]["master-key"]))) == 32
    assert len(base64.b64decode(secret["data"]["admin-token"])) >= 32
    gateway = env(objs, "gateway")
    assert _secret_ref(gateway["KEFU_ADMIN_TOKEN"]) == ("kefu-secrets", "admin-token")
    assert _secret_ref(gateway["KEFU_SECRET_KEY"]) == ("kefu-secrets", "secret-key")
    for service in SERVICES:
        e = env(objs, service)
        assert ("KEFU_MASTER_KEY" in e) == (service in KEY_SERVICES), service
        assert "KEFU_ADMIN_TOKEN" not in e or service == "gateway"
        if "KEFU_MASTER_KEY" in e:
            assert _secret_ref(e["KEFU_MASTER_KEY"]) == ("kefu-secrets", "master-key")
            assert e["KEFU_MASTER_KEY_OLD"]["secretKeyRef"]["optional"] is True
    # Every service whose code opens a Keyring is given the key.
    users = {s for s in SERVICES if any("Keyring" in f.read_text() for f in (ROOT / "services" / s / "src").rglob("*.py"))}
    assert users <= set(KEY_SERVICES), users - set(KEY_SERVICES)
    # Pods that read a key roll when it changes.
    for service in KEY_SERVICES:
        assert "checksum/secret" in objects(objs, "Deployment")[f"kefu-{service}"]["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in objects(objs, "Deployment")["kefu-retrieval"]["spec"]["template"]["metadata"]["annotations"]
    key = base64.b64encode(bytes(range(32))).decode()
    objs = render(f"encryption.masterKey={key}", "auth.adminToken=let-me-in-0123456789", "encryption.crypto=sm")
    secret = objects(objs, "Secret")["kefu-secrets"]["data"]
    assert base64.b64decode(secret["master-key"]).decode() == key
    assert base64.b64decode(secret["admin-token"]).decode() == "let-me-in-0123456789"
    assert {env(objs, s)["KEFU_CRYPTO"] for s in SERVICES} == {"sm"}
    # A rotation's previous key goes to master-key-old, which the pods read as KEFU_MASTER_KEY_OLD.
    new = base64.b64encode(bytes(range(1, 33))).decode()
    data = objects(render(f"encryption.previousMasterKey={new}"), "Secret")["kefu-secrets"]["data"]
    assert base64.b64decode(data["master-key-old"]).decode() == new and "master-key" in data
    assert "master-key-old" not in objects(render(), "Secret")["kefu-secrets"]["data"]
    assert "previousMasterKey must be the base64 of 32 bytes" in render_error("encryption.previousMasterKey=abcd")


def test_existing_secrets_are_used_and_not_created() -> None:
    objs = render("auth.existingSecret=vault-auth", "encryption.existingSecret=vault-key")
    assert not objects(objs, "Secret")
    gateway = env(objs, "gateway")
    assert _secret_ref(gateway["KEFU_ADMIN_TOKEN"]) == ("vault-auth", "admin-token")
    assert _secret_ref(gateway["KEFU_MASTER_KEY"]) == ("vault-key", "master-key")
    assert "checksum/secret" not in objects(objs, "Deployment")["kefu-gateway"]["spec"]["template"]["metadata"]["annotations"]
    # Only the auth Secret given: the chart still makes the master key.
    objs = render("auth.existingSecret=vault-auth")
    assert set(objects(objs, "Secret")["kefu-secrets"]["data"]) == {"master-key"}
    objs = render("encryption.enabled=false")
    assert set(objects(objs, "Secret")["kefu-secrets"]["data"]) == {"admin-token", "secret-key"}
    assert not any("KEFU_MASTER_KEY" in env(objs, s) for s in SERVICES)


def test_probes_use_grpc_health_and_the_metrics_port() -> None:
    objs = render("metrics.port=9400", "inference.probes.startup.failureThreshold=500")
    gateway = container(objs, "gateway")
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for service in SERVICES[1:]:
        c = container(objs, service)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9400}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert env(objs, service)["KEFU_METRICS_PORT"] == "9400"
        annotations = objects(objs, "Deployment")[f"kefu-{service}"]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9400"
    assert container(objs, "inference")["startupProbe"]["failureThreshold"] == 500
    assert objects(objs, "Service")["kefu-dialogue"]["spec"]["ports"] == [
        {"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}]


def _allows(policy: dict[str, Any], port: str) -> list[Any]:
    """The `from` lists of the rules of ``policy`` that open ``port`` ([] inside: from anywhere)."""
    return [rule.get("from", []) for rule in policy["spec"].get("ingress", [])
            if any(p["port"] == port for p in rule.get("ports", []))]


def test_network_policies_leave_only_the_gateway_reachable_from_outside() -> None:
    objs = render()
    policies = objects(objs, "NetworkPolicy")
    release = {"app.kubernetes.io/name": "kefu", "app.kubernetes.io/instance": "kefu"}
    deny = policies["kefu-default-deny"]["spec"]
    assert deny["podSelector"] == {"matchLabels": release} and "ingress" not in deny
    pods = chart_lint._pods(objs)
    assert all(chart_lint._matches(deny["podSelector"], labels) for _, labels, _ in pods)
    # Only the gateway has a rule open to any source, on its HTTP and gRPC ports.
    open_rules = [(name, rule) for name, p in policies.items() for rule in p["spec"].get("ingress", []) if not rule.get("from")]
    assert [name for name, _ in open_rules] == ["kefu-gateway"]
    assert {p["port"] for p in open_rules[0][1]["ports"]} == {"http", "grpc"}
    # NATS accepts clients of the release only; its monitoring port and every metrics port, Prometheus's namespace.
    assert _allows(policies["kefu-nats"], "nats") == [[{"podSelector": {"matchLabels": release}}]]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert _allows(policies["kefu-nats"], "monitor") == [monitoring]
    assert _allows(policies["kefu-metrics"], "metrics") == [monitoring]
    metrics_selected = {lab["app.kubernetes.io/component"] for _, lab, _ in pods
                        if chart_lint._matches(policies["kefu-metrics"]["spec"]["podSelector"], lab)}
    assert metrics_selected == set(SERVICES)
    # A restricted gateway still lets the release's own test pod in.
    objs = render("networkPolicy.gatewayFrom[0].namespaceSelector.matchLabels.team=web")
    gateway_from = _allows(objects(objs, "NetworkPolicy")["kefu-gateway"], "http")[0]
    assert gateway_from == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}, {"podSelector": {"matchLabels": release}}]
    assert not objects(render("networkPolicy.enabled=false"), "NetworkPolicy")


def test_egress_restriction_allows_dns_nats_and_what_is_listed() -> None:
    objs = render("networkPolicy.egress.enabled=true",
                  "networkPolicy.egress.plugins[0].to[0].ipBlock.cidr=10.20.0.0/16")
    policies = objects(objs, "NetworkPolicy")
    assert policies["kefu-default-deny"]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress = policies["kefu-egress"]["spec"]["egress"]
    assert {p["port"] for p in egress[0]["ports"]} == {53}
    assert egress[1]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "nats"
    assert policies["kefu-plugins-egress"]["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}]


def test_inference_runs_on_arm_or_gpu_nodes_with_a_model_from_a_volume() -> None:
    objs = render(values=CHART / "examples" / "inference-arm.yaml")
    pod = objects(objs, "Deployment")["kefu-inference"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert pod["tolerations"][0]["value"] == "arm64" and "podAntiAffinity" in pod["affinity"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "kefu-models", "readOnly": True}} in pod["volumes"]
    assert env(objs, "inference")["KEFU_LLM_MODEL"] == "/models-custom/qwen2.5-3b-instruct-q4_k_m.gguf"
    assert {"name": "models", "mountPath": "/models-custom", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    # Only inference moves: the other services keep their nodes.
    assert "nodeSelector" not in objects(objs, "Deployment")["kefu-dialogue"]["spec"]["template"]["spec"]

    objs = render(values=CHART / "examples" / "inference-gpu.yaml")
    dep = objects(objs, "Deployment")["kefu-inference"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["image"] == "kefu/inference-cuda:0.1.0"
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert {"name": "models", "hostPath": {"path": "/var/lib/kefu/models", "type": "Directory"}} in pod["volumes"]
    assert env(objs, "inference")["KEFU_LLM_GPU_LAYERS"] == "-1"

    objs = render("inference.model.source=pvc", "inference.model.path=m.gguf", "retrieval.model.source=existingClaim",
                  "retrieval.model.existingClaim=embedders", "retrieval.model.path=bge-m3")
    claim = objects(objs, "PersistentVolumeClaim")["kefu-inference-models"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert env(objs, "retrieval")["KEFU_EMBED_MODEL"] == "/models-custom/bge-m3"
    assert "KEFU_LLM_MODEL" not in env(render(), "inference")  # the image's own model by default


def test_images_follow_the_registry_and_tag() -> None:
    objs = render("image.registry=registry.internal:5000/kefu", "image.tag=1.2.3", "inference.image.tag=1.2.3-cuda",
                  "image.pullSecrets[0].name=regcred")
    assert container(objs, "gateway")["image"] == "registry.internal:5000/kefu/gateway:1.2.3"
    assert container(objs, "inference")["image"] == "registry.internal:5000/kefu/inference:1.2.3-cuda"
    assert objects(objs, "Pod")["kefu-test"]["spec"]["containers"][0]["image"] == "registry.internal:5000/kefu/gateway:1.2.3"
    assert objects(objs, "Deployment")["kefu-plugins"]["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(render(), "dialogue")["image"] == "kefu/dialogue:0.1.0"  # the chart's appVersion


def test_no_service_links_so_no_stray_kefu_variables() -> None:
    # Services named kefu-… would otherwise put KEFU_NATS_PORT=tcp://… and the like into every pod's
    # environment, where the settings read KEFU_*.
    objs = render()
    for _, _, spec in chart_lint._pods(objs):
        assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False


def test_service_monitor_and_grafana_dashboard_are_opt_in() -> None:
    assert not objects(render(), "ServiceMonitor") and "kefu-dashboard" not in objects(render(), "ConfigMap")
    objs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom",
                  "metrics.dashboard.enabled=true", "metrics.dashboard.namespace=monitoring")
    monitor = objects(objs, "ServiceMonitor")["kefu"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selected = [n for n, s in objects(objs, "Service").items()
                if chart_lint._matches(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(selected) == sorted(f"kefu-{s}" for s in SERVICES)
    dashboard = objects(objs, "ConfigMap")["kefu-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["kefu.json"])["uid"] == "kefu-overview"


CONTRACT_METRICS = {
    "kefu_turn_duration_seconds", "kefu_llm_time_to_first_token_seconds", "kefu_llm_tokens_total",
    "kefu_llm_generation_seconds", "kefu_llm_queue_depth", "kefu_kb_freshness_lag_seconds", "kefu_errors_total",
    "kefu_http_requests_total", "kefu_ws_connections", "kefu_plugin_calls_total",
}
CONTRACT_LABELS = {"kefu_turn_duration_seconds": {"source", "le"}, "kefu_errors_total": {"service", "code"},
                   "kefu_http_requests_total": {"route", "status"}, "kefu_plugin_calls_total": {"plugin", "tool", "outcome"}}


def test_the_dashboard_uses_exactly_the_metrics_the_services_export() -> None:
    dashboard = json.loads((CHART / "files" / "grafana" / "kefu.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\b(kefu_\w+|process_\w+)", e)}
    assert {m for m in used if m.startswith("kefu_")} == CONTRACT_METRICS
    # The names the services really register (kefu.shared.metrics) are the ones the dashboard reads.
    source = (ROOT / "shared" / "src" / "kefu" / "shared" / "metrics.py").read_text()
    assert set(re.findall(r'"(kefu_[a-z_]+)"', source)) == CONTRACT_METRICS
    for expr in exprs:
        for metric, allowed in CONTRACT_LABELS.items():
            if metric in expr:
                by = set().union(*(set(g.replace(" ", "").split(",")) for g in re.findall(r"by \(([^)]*)\)", expr))) \
                    if "by (" in expr else set()
                assert by <= allowed, (expr, by)
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {"${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_umbrella_chart_wires_kefu_to_the_official_nats_chart(tmp_path: Path) -> None:
    """charts/kefu-nats, rendered with kefu packaged beside it (the NATS chart itself needs the network)."""
    umbrella = tmp_path / "kefu-nats"
    shutil.copytree(ROOT / "charts" / "kefu-nats", umbrella)
    (umbrella / "charts").mkdir()
    proc = subprocess.run([str(HELM), "package", str(CHART), "-d", str(umbrella / "charts")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = yaml.safe_load((umbrella / "Chart.yaml").read_text())
    nats_dep = next(d for d in meta["dependencies"] if d["name"] == "nats")
    assert nats_dep["condition"] == "nats.enabled" and nats_dep["repository"].startswith("https://")
    meta["dependencies"] = [d for d in meta["dependencies"] if d["name"] == "kefu"]
    (umbrella / "Chart.yaml").write_text(yaml.safe_dump(meta))
    objs = render(chart=umbrella, release="support")
    assert not objects(objs, "StatefulSet")  # the official chart's servers, not kefu's own
    assert {env(objs, s, "support-kefu")["KEFU_NATS_URL"] for s in SERVICES} == {"nats://support-nats:4222"}
    values = yaml.safe_load((ROOT / "charts" / "kefu-nats" / "values.yaml").read_text())
    assert values["nats"]["config"]["jetstream"]["enabled"] is True



def test_the_install_notes_name_what_the_chart_made(tmp_path: Path) -> None:
    """NOTES.txt (printed by helm install) renders only on a cluster: here, as a ConfigMap of a copy."""
    copy = tmp_path / "kefu"
    shutil.copytree(CHART, copy)
    # Without whitespace trimming, so every line keeps the block scalar's indentation.
    notes = (CHART / "templates" / "NOTES.txt").read_text().replace("{{-", "{{").replace("-}}", "}}")
    (copy / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        + "".join(f"    {line}\n" for line in notes.splitlines()))
    objs = render(chart=copy)
    text = objects(objs, "ConfigMap")["notes"]["data"]["notes"]
    assert "svc/kefu-gateway 8080:8080 50051:50051" in text
    assert "get secret kefu-secrets -o jsonpath='{.data.admin-token}'" in text
    assert "NATS: the chart's own server with JetStream (nats://kefu-nats:4222)" in text
    assert "helm test kefu -n kefu" in text and "Back up the Secret kefu-secrets" in text
    text = objects(render("nats.url=nats://nats.messaging:4222", "auth.existingSecret=mine",
                          "encryption.existingSecret=key", chart=copy), "ConfigMap")["notes"]["data"]["notes"]
    assert "NATS: nats://nats.messaging:4222" in text and "get secret mine " in text and "Back up" not in text


def test_tls_to_nats_and_on_grpc_by_configuration() -> None:
    objs = render("tls.nats.enabled=true", "tls.nats.secretName=client-tls", "tls.nats.serverSecretName=server-tls",
                  "tls.grpc.enabled=true", "tls.grpc.secretName=gw-tls", "tls.grpc.clientAuth=true")
    conf = objects(objs, "ConfigMap")["kefu-nats-config"]["data"]["nats.conf"]
    assert "ca_file: /etc/nats-tls/ca.crt" in conf and "verify: true" in conf
    nats_pod = objects(objs, "StatefulSet")["kefu-nats"]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "server-tls", "defaultMode": 0o440}} in nats_pod["volumes"]
    for service in SERVICES:
        e = env(objs, service)
        assert e["KEFU_NATS_URL"] == "tls://kefu-nats:4222"
        assert (e["KEFU_NATS_TLS_CA"], e["KEFU_NATS_TLS_CERT"]) == ("/etc/kefu/nats-tls/ca.crt", "/etc/kefu/nats-tls/tls.crt")
        pod = objects(objs, "Deployment")[f"kefu-{service}"]["spec"]["template"]["spec"]
        assert {"name": "nats-tls", "secret": {"secretName": "client-tls", "defaultMode": 0o440}} in pod["volumes"]
        assert ("KEFU_GRPC_TLS_CERT" in e) == (service == "gateway")
    assert env(objs, "gateway")["KEFU_GRPC_TLS_CLIENT_CA"] == "/etc/kefu/grpc-tls/ca.crt"
    # The kubelet's gRPC probe cannot speak TLS: the gateway is then probed on /readyz.
    assert container(objs, "gateway")["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    objs = render("tls.nats.enabled=true", "tls.nats.secretName=ca-only", "tls.nats.clientCertificate=false",
                  "nats.url=tls://nats.messaging:4222")
    assert "KEFU_NATS_TLS_CERT" not in env(objs, "dialogue") and env(objs, "dialogue")["KEFU_NATS_TLS_CA"]
    assert "tls.nats.serverSecretName" in render_error("tls.nats.enabled=true", "tls.nats.secretName=x")
    assert "tls.grpc.secretName" in render_error("tls.grpc.enabled=true")
