"""make chart-lint: lint charts/kefu, render it with every values file, validate what it renders.

For the defaults and each values file in charts/kefu/ci/ and charts/kefu/examples/:

1. ``helm lint --strict`` (values.schema.json included);
2. ``helm template``;
3. every object against the Kubernetes JSON schemas (kubernetes-validate, which carries them: no
   network), strict — an unknown field is an error —, for the oldest Kubernetes the chart supports
   and the newest the schemas know;
4. what a schema cannot see: selectors that select nothing, ports, Secrets, ConfigMaps, claims and
   volumes named but not there, duplicate environment variables, containers without resources or
   with a writable root filesystem, an HPA whose Deployment also sets replicas.

charts/kefu-nats (the umbrella with the official NATS chart) is linted too; its dependencies cannot be
fetched offline, so it is not rendered here.

    python tools/chart_lint.py [--helm .tools/helm/helm] [-v]

Exit status 1 with every problem listed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kefu"
UMBRELLA = ROOT / "charts" / "kefu-nats"
# The chart's kubeVersion floor (gRPC probes) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
WORKLOADS = ("Deployment", "StatefulSet")

Obj = dict[str, Any]


def values_files() -> list[Path | None]:
    """None (the defaults), then every ci/ and examples/ values file."""
    return [None, *sorted((CHART / "ci").glob("*.yaml")), *sorted((CHART / "examples").glob("*.yaml"))]


def helm(helm_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=120)


def render(helm_bin: str, values: Path | None = None, *extra: str, chart: Path = CHART,
           release: str = "kefu") -> list[Obj]:
    """The objects ``helm template`` renders (hooks such as the test pod included).

    Raises:
        RuntimeError: helm failed; its message is the error's.
    """
    args = ["template", release, str(chart), "--namespace", "kefu"]
    if values:
        args += ["-f", str(values)]
    proc = helm(helm_bin, *args, *extra)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip() or proc.stdout.strip())
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def schema_problems(objs: Iterable[Obj]) -> list[str]:
    """Objects that do not match the Kubernetes schemas (strict: unknown fields are errors)."""
    problems = []
    for obj in objs:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            problems += [f"{name}: {p}" for p in _service_monitor_problems(obj)]
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{name}: Kubernetes {version}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{name}: no Kubernetes {version} schema for {obj.get('apiVersion')} {obj.get('kind')}")
    return problems


def _service_monitor_problems(obj: Obj) -> list[str]:
    # No CRD schemas ship offline: the fields the Prometheus Operator needs, checked by hand.
    spec, problems = obj.get("spec") or {}, []
    if not (spec.get("selector") or {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels is empty")
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problems.append("spec.endpoints is empty")
    for ep in endpoints:
        if set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings"}:
            problems.append(f"endpoint with unknown fields {sorted(set(ep))}")
        if not ep.get("port"):
            problems.append("an endpoint without a port")
    return problems


def _matches(selector: Obj, labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) \
                or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _pods(objs: list[Obj]) -> list[tuple[str, dict[str, str], Obj]]:
    """(owner name, pod labels, pod spec) of every workload and bare pod."""
    out = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in WORKLOADS:
            template = obj["spec"]["template"]
            spec = dict(template["spec"])
            # A StatefulSet's claim templates are volumes of its pods.
            spec["volumes"] = [*(spec.get("volumes") or []), *({"name": t["metadata"]["name"], "persistentVolumeClaim": {
                "claimName": t["metadata"]["name"]}} for t in obj["spec"].get("volumeClaimTemplates") or [])]
            out.append((name, template["metadata"].get("labels") or {}, spec))
        elif obj["kind"] == "Pod":
            out.append((name, obj["metadata"].get("labels") or {}, obj["spec"]))
    return out


def _container_ports(spec: Obj) -> tuple[set[str], set[int]]:
    names, numbers = set(), set()
    for c in spec.get("containers", []):
        for p in c.get("ports") or []:
            numbers.add(p["containerPort"])
            if p.get("name"):
                names.add(p["name"])
    return names, numbers


def consistency_problems(objs: list[Obj], external: set[str] = frozenset()) -> list[str]:
    """What the schemas cannot see: references between the objects, and the chart's own rules.

    ``external``: names of existing objects the values refer to (a Secret, claim or ConfigMap that is
    referenced must be rendered or be one of them).
    """
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    by_kind: dict[str, dict[str, Obj]] = {}
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if (kind, name) in seen:
            problems.append(f"{kind}/{name} is rendered twice")
        seen.add((kind, name))
        by_kind.setdefault(kind, {})[name] = obj
        if len(name) > 63 or not DNS_1123.match(name):
            problems.append(f"{kind}/{name}: not a valid object name")
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") != "Helm":
            problems.append(f"{kind}/{name}: lacks the chart's labels")
    secrets = {n: set((o.get("data") or {}) | (o.get("stringData") or {})) for n, o in by_kind.get("Secret", {}).items()}
    configmaps = {n: set(o.get("data") or {}) for n, o in by_kind.get("ConfigMap", {}).items()}
    claims = set(by_kind.get("PersistentVolumeClaim", {})) | {
        t["metadata"]["name"] for o in by_kind.get("StatefulSet", {}).values() for t in o["spec"].get("volumeClaimTemplates") or []}
    pods = _pods(objs)

    for owner, _labels, spec in pods:
        problems += [f"{owner}: {p}" for p in _pod_problems(spec, secrets, configmaps, claims, external)]
    for kind in WORKLOADS:
        for name, obj in by_kind.get(kind, {}).items():
            template_labels = obj["spec"]["template"]["metadata"].get("labels") or {}
            if not _matches(obj["spec"]["selector"], template_labels):
                problems.append(f"{kind}/{name}: its selector does not select its own pods")
            strategy = obj["spec"].get("strategy") or {}
            if strategy.get("type") == "Recreate" and "rollingUpdate" in strategy:
                problems.append(f"{kind}/{name}: strategy Recreate with rollingUpdate (the API refuses it)")
            if kind == "StatefulSet":
                service = by_kind.get("Service", {}).get(obj["spec"].get("serviceName", ""))
                if not service or service["spec"].get("clusterIP") != "None":
                    problems.append(f"{kind}/{name}: serviceName is not a headless Service of the release")
    for name, svc in by_kind.get("Service", {}).items():
        selected = [(o, s) for o, lab, s in pods if not o.startswith("Pod/") and _matches({"matchLabels": svc["spec"].get("selector") or {}}, lab)]
        if not selected:
            problems.append(f"Service/{name}: selects no pod")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for owner, spec in selected:
                names, numbers = _container_ports(spec)
                if target not in names and target not in numbers:
                    problems.append(f"Service/{name}: targetPort {target} is not a port of {owner}")
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            problems.append(f"HorizontalPodAutoscaler/{name}: scales {ref['kind']}/{ref['name']}, which is not rendered")
        elif "replicas" in target["spec"]:
            problems.append(f"HorizontalPodAutoscaler/{name}: {ref['name']} also sets replicas (each upgrade would reset it)")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problems.append(f"HorizontalPodAutoscaler/{name}: minReplicas > maxReplicas")
        if not hpa["spec"].get("metrics"):
            problems.append(f"HorizontalPodAutoscaler/{name}: no metrics")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not any(_matches(pdb["spec"]["selector"], lab) for o, lab, _ in pods if not o.startswith("Pod/")):
            problems.append(f"PodDisruptionBudget/{name}: selects no pod")
    for name, policy in by_kind.get("NetworkPolicy", {}).items():
        selected = [(o, s) for o, lab, s in pods if _matches(policy["spec"]["podSelector"], lab)]
        if not selected:
            problems.append(f"NetworkPolicy/{name}: selects no pod")
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), str) and not any(port["port"] in _container_ports(s)[0] for _, s in selected):
                    problems.append(f"NetworkPolicy/{name}: port {port['port']} is no port of the pods it selects")
    for name, monitor in by_kind.get("ServiceMonitor", {}).items():
        services = [s for s in by_kind.get("Service", {}).values()
                    if _matches(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not services:
            problems.append(f"ServiceMonitor/{name}: selects no Service")
        for ep in monitor["spec"].get("endpoints") or []:
            lacking = [s["metadata"]["name"] for s in services if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}]
            if lacking:
                problems.append(f"ServiceMonitor/{name}: port {ep.get('port')} is not on {lacking}")
    return problems


def _pod_problems(spec: Obj, secrets: dict[str, set[str]], configmaps: dict[str, set[str]], claims: set[str],
                  external: set[str]) -> list[str]:
    problems = []
    volumes = {}
    for v in spec.get("volumes") or []:
        if v["name"] in volumes:
            problems.append(f"volume {v['name']} defined twice")
        volumes[v["name"]] = v
        if "configMap" in v and v["configMap"]["name"] not in set(configmaps) | external:
            problems.append(f"volume {v['name']}: ConfigMap {v['configMap']['name']} is neither rendered nor named in the values")
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims | external:
            problems.append(f"volume {v['name']}: claim {v['persistentVolumeClaim']['claimName']} is neither rendered nor named in the values")
        if "secret" in v and v["secret"]["secretName"] not in set(secrets) | external:
            problems.append(f"volume {v['name']}: Secret {v['secret']['secretName']} is neither rendered nor named in the values")
    if not (spec.get("securityContext") or {}).get("runAsNonRoot"):
        problems.append("the pod may run as root (securityContext.runAsNonRoot)")
    for c in spec.get("containers", []):
        where = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: needs readOnlyRootFilesystem and no privilege escalation")
        resources = c.get("resources") or {}
        if not (resources.get("requests") or {}).get("memory") or not (resources.get("limits") or {}).get("memory"):
            problems.append(f"{where}: needs a memory request and limit")
        env_names = [e["name"] for e in c.get("env") or []]
        for dup in sorted({n for n in env_names if env_names.count(n) > 1}):
            problems.append(f"{where}: environment variable {dup} set twice")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            if ref["name"] in secrets:
                if ref["key"] not in secrets[ref["name"]] and not ref.get("optional"):
                    problems.append(f"{where}: {e['name']} reads key {ref['key']} that Secret {ref['name']} lacks")
            elif ref["name"] not in external:
                problems.append(f"{where}: {e['name']} reads Secret {ref['name']}, neither rendered nor named in the values")
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                problems.append(f"{where}: mounts volume {m['name']}, which the pod does not define")
        names, numbers = _container_ports(spec)
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if not probe:
                continue
            port = next((probe[k].get("port") for k in ("httpGet", "tcpSocket", "grpc") if k in probe), None)
            if port is not None and port not in names and port not in numbers:
                problems.append(f"{where}: {probe_name} on port {port}, which the container does not open")
    return problems


def named_in(values: Path | None) -> set[str]:
    """Every string of a values file: the existing objects (claims, Secrets, ConfigMaps) it may name."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, str):
            found.add(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    if values:
        walk(yaml.safe_load(values.read_text()))
    return found


def lint(helm_bin: str, verbose: bool = False) -> list[str]:
    """Every problem of the chart, as lines; an empty list when it is sound."""
    problems = []
    for values in values_files():
        label = values.relative_to(ROOT).as_posix() if values else "default values"
        args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
        proc = helm(helm_bin, *args)
        if proc.returncode:
            problems.append(f"[{label}] helm lint: {proc.stdout.strip()} {proc.stderr.strip()}")
        try:
            objs = render(helm_bin, values)
        except RuntimeError as exc:
            problems.append(f"[{label}] helm template: {exc}")
            continue
        found = schema_problems(objs) + consistency_problems(objs, named_in(values))
        problems += [f"[{label}] {p}" for p in found]
        if verbose:
            print(f"{label}: {len(objs)} objects, {len(found)} problems")
    proc = helm(helm_bin, "lint", str(UMBRELLA))
    if proc.returncode:
        problems.append(f"[charts/kefu-nats] helm lint: {proc.stdout.strip()} {proc.stderr.strip()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", default=str(ROOT / ".tools" / "helm" / "helm"), help="the helm binary")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.helm).exists():
        print(f"{args.helm} is missing: make {Path(args.helm).relative_to(ROOT) if Path(args.helm).is_absolute() else args.helm}",
              file=sys.stderr)
        return 2
    problems = lint(args.helm, args.verbose)
    for line in problems:
        print(line)
    count = len(values_files())
    print(f"chart-lint: {count} values files, Kubernetes {' and '.join(KUBE_VERSIONS)}: "
          + (f"{len(problems)} problems" if problems else "no problem"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
