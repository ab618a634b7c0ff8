"""What the chart renders, run for real: its NATS config on nats-server, the services started with the
environment their Deployments give them (probed the way the kubelet would), and the helm test's script
against the running stack."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kefu.shared.models import models_dir
from kefu.shared.natsserver import die_with_parent, find_nats_server, free_port
from kefu.shared.testing import load_tool

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm" / "helm"

pytestmark = [pytest.mark.chart, pytest.mark.integration]


chart_lint = load_tool(ROOT / "tools" / "chart_lint.py", "chart_lint")


def render(*sets: str) -> list[dict[str, Any]]:
    assert HELM.exists(), f"{HELM} is missing: `make .tools/helm/helm` (make test does it)"
    return chart_lint.render(str(HELM), None, *(a for s in sets for a in ("--set", s)))


def objects(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _http(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _pod_address() -> str:
    """An address of this machine that is not loopback, as the kubelet reaches a pod on its IP; the
    loopback address when the machine has no other."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return address if not address.startswith("127.") else "127.0.0.1"


async def test_the_nats_config_runs_jetstream_on_a_real_nats_server(tmp_path: Path) -> None:
    objs = render("nats.embedded.jetstream.maxFileStore=3Gi", "nats.embedded.maxPayload=8MB")
    proc, _, monitor = await _start_nats(objs, tmp_path)
    try:
        pod = objects(objs, "StatefulSet")["kefu-nats"]["spec"]["template"]["spec"]["containers"][0]
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = pod[name]["httpGet"]["path"]
            assert _http(f"http://127.0.0.1:{monitor}{path}") == (200, '{"status":"ok"}'), name
        varz = json.loads(_http(f"http://127.0.0.1:{monitor}/varz")[1])
        assert varz["server_name"] == "kefu-nats-0" and varz["max_payload"] == 8 * 1024 * 1024
        jsz = json.loads(_http(f"http://127.0.0.1:{monitor}/jsz")[1])
        assert jsz["config"]["max_storage"] == 3 * 1024**3 and jsz["config"]["max_memory"] == 256 * 1024**2
        # The preStop hook's lame-duck signal finds the server through the pid file.
        assert int((tmp_path / "nats.pid").read_text()) == proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


def _resolve_env(objs: list[dict[str, Any]], container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The environment the kubelet would give the container: values, Secret keys, the pod's name."""
    secrets = {name: obj.get("data", {}) for name, obj in objects(objs, "Secret").items()}
    out = {}
    for e in container["env"]:
        source = e.get("valueFrom")
        if source is None:
            out[e["name"]] = e["value"]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            out[e["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            data = secrets[ref["name"]]
            if ref["key"] in data:
                out[e["name"]] = base64.b64decode(data[ref["key"]]).decode()
            else:
                assert ref.get("optional"), f"{e['name']}: Secret {ref['name']} has no key {ref['key']}"
    return out


async def _grpc_serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _start_nats(objs: list[dict[str, Any]], tmp_path: Path,
                      tls_dir: Path | None = None) -> tuple[asyncio.subprocess.Process, int, int]:
    """The chart's NATS: its ConfigMap and command, with the pod's paths and ports moved to this machine's."""
    conf = objects(objs, "ConfigMap")["kefu-nats-config"]["data"]["nats.conf"]
    if tls_dir is not None:
        conf = conf.replace("/etc/nats-tls/", f"{tls_dir}/")
    client, monitor = free_port(), free_port()
    conf = (conf.replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
                .replace("pid_file: /tmp/nats.pid", f"pid_file: {tmp_path / 'nats.pid'}")
                .replace("port: 4222", f"port: {client}").replace("http_port: 8222", f"http_port: {monitor}"))
    (tmp_path / "nats.conf").write_text(conf)
    pod = objects(objs, "StatefulSet")["kefu-nats"]["spec"]["template"]["spec"]["containers"][0]
    command = [find_nats_server(), *pod["command"][1:-1], str(tmp_path / "nats.conf")]
    proc = await asyncio.create_subprocess_exec(*command, env={"SERVER_NAME": "kefu-nats-0"},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                preexec_fn=die_with_parent)
    startup = pod["startupProbe"]["httpGet"]["path"]
    deadline = time.monotonic() + 20
    while (await asyncio.to_thread(_http, f"http://127.0.0.1:{monitor}{startup}"))[0] != 200:
        assert proc.returncode is None, (await proc.stderr.read()).decode()
        assert time.monotonic() < deadline, "nats-server did not come up with the chart's config"
        await asyncio.sleep(0.2)
    return proc, client, monitor


@pytest.mark.model
async def test_the_release_runs_from_what_the_chart_renders(models_data_dir: Path, tmp_path: Path) -> None:
    """NATS from its ConfigMap, the five services with their Deployment's environment (Secrets resolved),
    probed as the kubelet would on a non-loopback address; then the helm test pod's own script."""
    objs = render()
    host = _pod_address()
    nats, nats_port, _ = await _start_nats(objs, tmp_path)
    procs: dict[str, asyncio.subprocess.Process] = {}
    ports: dict[str, dict[Any, int]] = {}
    containers: dict[str, dict[str, Any]] = {}
    try:
        for service in ("gateway", "dialogue", "retrieval", "inference", "plugins"):
            container = objects(objs, "Deployment")[f"kefu-{service}"]["spec"]["template"]["spec"]["containers"][0]
            env = _resolve_env(objs, container, f"kefu-{service}-7d9f-abcde")
            # Each container port of the pod on a free port here (other tests and runs share this machine).
            mapping = {p["containerPort"]: free_port() for p in container["ports"]}
            ports[service] = {**mapping, **{p["name"]: mapping[p["containerPort"]] for p in container["ports"]}}
            for key in ("KEFU_METRICS_PORT", "KEFU_HTTP_PORT", "KEFU_GRPC_PORT"):
                if key in env:
                    env[key] = str(mapping[int(env[key])])
            assert env["KEFU_NATS_URL"] == "nats://kefu-nats:4222"
            # The Service's DNS name, the pod's volumes and the image's models directory, as they are here.
            env.update(KEFU_NATS_URL=f"nats://127.0.0.1:{nats_port}", KEFU_DATA_DIR=str(tmp_path / service),
                       KEFU_MODELS_DIR=str(models_dir(models_data_dir)), KEFU_LOG_LEVEL="warning",
                       PATH=os.environ["PATH"], HOME=str(tmp_path))
            containers[service] = container
            procs[service] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"kefu.{service}", env=env, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)

        async def probe(service: str, kind: str) -> bool:
            spec = containers[service][kind]
            if "grpc" in spec:
                return await _grpc_serving(f"{host}:{ports[service][spec['grpc']['port']]}")
            get = spec["httpGet"]
            status, _ = await asyncio.to_thread(_http, f"http://{host}:{ports[service][get['port']]}{get['path']}")
            return status == 200

        deadline = time.monotonic() + 240
        for service, proc in procs.items():
            while not await probe(service, "startupProbe"):
                if proc.returncode is not None or time.monotonic() > deadline:
                    err = (await proc.stderr.read()).decode() if proc.returncode is not None else "(still running)"
                    pytest.fail(f"{service} never passed its startup probe: {err[-3000:]}")
                await asyncio.sleep(0.3)
            for kind in ("readinessProbe", "livenessProbe"):
                assert await probe(service, kind), f"{service}: {kind} fails"
            status, text = await asyncio.to_thread(_http, f"http://{host}:{ports[service]['metrics']}/metrics")
            assert status == 200 and "kefu_errors_total" in text, service

        # helm test: the test pod's script with its environment, the gateway's Service being the local port.
        test = objects(objs, "Pod")["kefu-test"]["spec"]["containers"][0]
        assert test["command"] == ["python", "-c"]
        env = _resolve_env(objs, test, "kefu-test")
        assert env["KEFU_URL"] == "http://kefu-gateway:8080"
        env.update(KEFU_URL=f"http://127.0.0.1:{ports['gateway']['http']}", PATH=os.environ["PATH"])
        out, err, code = await _run(test["args"][0], env)
        assert code == 0, out + err
        assert "ok: conversation" in out
        # The answer was a real one: it went through dialogue, retrieval and the model's queue.
        metrics = (await asyncio.to_thread(_http, f"http://{host}:{ports['dialogue']['metrics']}/metrics"))[1]
        assert "kefu_turn_duration_seconds_count" in metrics
        # And the script fails, saying why, when the release is not right (here: the admin token).
        out, err, code = await _run(test["args"][0], {**env, "KEFU_ADMIN_TOKEN": "not-the-token"})
        assert code == 1 and "HTTP 403" in err and "admin token" in err, out + err
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for service, proc in procs.items():
            # Within the pod's terminationGracePeriodSeconds, cleanly.
            grace = objects(objs, "Deployment")[f"kefu-{service}"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            code = await asyncio.wait_for(proc.wait(), grace)
            assert code == 0, f"{service} exited {code} on SIGTERM: {(await proc.stderr.read()).decode()[-2000:]}"
        nats.send_signal(signal.SIGTERM)
        await asyncio.wait_for(nats.wait(), 20)


async def _run(script: str, env: dict[str, str]) -> tuple[str, str, int]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 200)
    return out.decode(), err.decode(), proc.returncode or 0


def _make_tls(d: Path) -> None:
    """A CA; in d/server the NATS server's tls.crt/tls.key (for kefu-nats and 127.0.0.1) with ca.crt; in
    d/client a client certificate the CA signed; in d/rogue one from another CA. The kubernetes.io/tls layout."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(key, subject: str, issuer: str, issuer_key, *, ca: bool = False, usage=None, sans=()) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer)).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, rogue_ca = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(ca_key, "kefu CA", "kefu CA", ca_key, ca=True)
    sans = (x509.DNSName("kefu-nats"), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for sub, issuer, issuer_key, usage in (("server", "kefu CA", ca_key, ExtendedKeyUsageOID.SERVER_AUTH),
                                           ("client", "kefu CA", ca_key, ExtendedKeyUsageOID.CLIENT_AUTH),
                                           ("rogue", "rogue CA", rogue_ca, ExtendedKeyUsageOID.CLIENT_AUTH)):
        (d / sub).mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        (d / sub / "tls.crt").write_bytes(cert(key, f"kefu-{sub}", issuer, issuer_key, usage=usage,
                                               sans=sans if sub == "server" else ()))
        (d / sub / "tls.key").write_bytes(pem(key))
        (d / sub / "ca.crt").write_bytes(ca)


async def test_the_charts_nats_tls_makes_services_and_nats_use_mtls(tmp_path: Path) -> None:
    """tls.nats on: the chart's NATS requires client certificates; a service with the chart's environment
    (its Secret mounted where the chart mounts it) connects and is ready; a client without one, or with a
    certificate of another CA, is refused."""
    objs = render("tls.nats.enabled=true", "tls.nats.secretName=client-tls", "tls.nats.serverSecretName=server-tls")
    _make_tls(tmp_path / "pki")
    nats, nats_port, _ = await _start_nats(objs, tmp_path, tmp_path / "pki" / "server")
    container = objects(objs, "Deployment")["kefu-plugins"]["spec"]["template"]["spec"]["containers"][0]
    proc = None
    try:
        env = _resolve_env(objs, container, "kefu-plugins-0")
        assert env["KEFU_NATS_URL"].startswith("tls://")
        metrics = free_port()
        env = {k: v.replace("/etc/kefu/nats-tls/", f"{tmp_path / 'pki' / 'client'}/") for k, v in env.items()}
        env.update(KEFU_NATS_URL=f"tls://127.0.0.1:{nats_port}", KEFU_DATA_DIR=str(tmp_path / "plugins"),
                   KEFU_METRICS_PORT=str(metrics), KEFU_LOG_LEVEL="warning", PATH=os.environ["PATH"], HOME=str(tmp_path))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kefu.plugins", env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                                                    preexec_fn=die_with_parent)
        deadline = time.monotonic() + 60
        while (await asyncio.to_thread(_http, f"http://127.0.0.1:{metrics}/readyz"))[0] != 200:
            if proc.returncode is not None or time.monotonic() > deadline:
                err = (await proc.stderr.read()).decode() if proc.returncode is not None else "(still running)"
                pytest.fail(f"plugins never got ready over TLS: {err[-3000:]}")
            await asyncio.sleep(0.3)
        import ssl

        import nats as nats_py

        for label, cert_dir in (("no certificate", None), ("another CA's", tmp_path / "pki" / "rogue")):
            ctx = ssl.create_default_context(cafile=str(tmp_path / "pki" / "server" / "ca.crt"))
            if cert_dir is not None:
                ctx.load_cert_chain(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
            with pytest.raises(Exception):  # noqa: B017 (the refusal surfaces as whichever error the handshake hits)
                nc = await nats_py.connect(f"tls://127.0.0.1:{nats_port}", tls=ctx, connect_timeout=2,
                                           allow_reconnect=False, max_reconnect_attempts=0)
                await nc.close()
                pytest.fail(f"NATS let in a client with {label}")
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        nats.send_signal(signal.SIGTERM)
        await asyncio.wait_for(nats.wait(), 20)
