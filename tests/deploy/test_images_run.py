"""The five images built by `make images`, run for real with podman as Docker would run them: read-only root
filesystem, the image's own non-root user, tmpfs /tmp, the compose file's volumes (gateway, retrieval and
plugins /data; the models read-only at /models-custom), on the host's network beside a real nats-server.
Each becomes healthy through its own HEALTHCHECK, runs as uid 10001 and cannot write its root filesystem;
a visitor then gets a cited answer through the gateway's HTTP API, with inference's model and retrieval's
embedder taken from the mounted volume (KEFU_LLM_MODEL, KEFU_EMBED_MODEL).

The arm64 gateway image (make images IMAGE_ARCH=arm64 IMAGE_SERVICES=gateway) runs too, under qemu-user
emulation, until its /healthz answers; so does the arm64 inference image (IMAGE_SERVICES=inference,
IMAGE_WHEELS=.kefu/wheels: make airgap-wheel-arm64's llama-cpp-python), until it generates from its model.

Marked ``images`` and run only when selected (`make images-test`: pytest -m images, about 2 minutes): skipped
where podman, root or the images are missing. Times (to healthy, first answer) go to
.kefu/images/run-<arch>.json, never asserted."""

from __future__ import annotations

import asyncio
import json
import platform
import resource
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.bus import Bus
from kefu.shared.models import DEFAULT_EMBED, DEFAULT_LLM, models_dir
from kefu.shared.natsserver import NatsServer, free_port
from kefu.shared.streams import LLM_GENERATE
from kefu.shared.testing import http

pytestmark = [pytest.mark.images, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["inference", "retrieval", "dialogue", "plugins", "gateway"]
WITH_DATA = {"gateway", "retrieval", "plugins"}  # the services with a /data volume in docker-compose.yml
ADMIN = "images-admin-token-0123456789abcd"
USER = "10001"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no version in pyproject.toml")


def image(name: str) -> str:
    return f"localhost/kefu/{name}:{version()}-{ARCH}"


def podman_base() -> list[str]:
    """podman, with runc where crun refuses this host's cgroups (v1 with controllers on v2 too)."""
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    hybrid = unified.exists() and unified.read_text().strip() and shutil.which("runc")
    return ["podman", *(["--runtime", "runc"] if hybrid else [])]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([*podman_base(), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, f"podman {' '.join(args)}: {run.stdout[-2000:]}{run.stderr[-2000:]}"
    return run


def why_not() -> str | None:
    if shutil.which("podman") is None:
        return "podman is missing (Debian: apt-get install podman runc)"
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        return "runs the images with podman as root"
    missing = [s for s in SERVICES if podman("image", "exists", image(s), check=False).returncode != 0]
    if missing:
        return f"not built: {', '.join(image(s) for s in missing)} (make images)"
    return None


if reason := why_not():
    pytest.skip(reason, allow_module_level=True)


def ulimits() -> list[str]:
    """podman raises nofile and nproc past this process's limits unless told; without CAP_SYS_RESOURCE (a
    sandbox) the runtime then fails, so the containers get what this process has."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    return ["--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", f"nproc={nproc}:{nproc}"]


@dataclass
class Stack:
    containers: dict[str, str]
    http: str
    healthy_s: dict[str, float]
    data: dict[str, Path]


@pytest.fixture(scope="module", autouse=True)
def selected(request: pytest.FixtureRequest) -> None:
    if "images" not in (request.config.option.markexpr or ""):
        pytest.skip("runs five containers (about 2 minutes): make images-test (pytest -m images)")


def run_args(name: str, env: dict[str, str], *extra: str) -> list[str]:
    """podman run as Docker would run the image (read-only, tmpfs /tmp, its own USER: no --user here), on this
    host's network: nats-server and the tests are on its loopback."""
    return ["run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp", "--network", "host", *ulimits(),
            *(arg for k, v in env.items() for arg in ("--env", f"{k}={v}")), *extra]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_data_dir: Path):
    root = tmp_path_factory.mktemp("images")
    nats = NatsServer(root / "nats", log_file=root / "nats.log").start()
    run_id = uuid.uuid4().hex[:8]
    models = models_dir(models_data_dir)  # the real default models, read-only at /models-custom
    http_port = free_port()
    common_env = {"KEFU_NATS_URL": nats.url, "KEFU_METRICS_HOST": "127.0.0.1", "KEFU_LOG_LEVEL": "info",
                  "KEFU_MASTER_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
    own_env = {
        "inference": {"KEFU_LLM_MODEL": f"/models-custom/{DEFAULT_LLM.name}", "KEFU_LLM_THREADS": "2"},
        "retrieval": {"KEFU_EMBED_MODEL": f"/models-custom/{DEFAULT_EMBED.name}"},
        "gateway": {"KEFU_ADMIN_TOKEN": ADMIN, "KEFU_HTTP_HOST": "127.0.0.1", "KEFU_HTTP_PORT": str(http_port),
                    "KEFU_GRPC_HOST": "127.0.0.1", "KEFU_GRPC_PORT": str(free_port())},
    }
    containers: dict[str, str] = {}
    data: dict[str, Path] = {}
    started: dict[str, float] = {}
    try:
        for s in SERVICES:
            name = f"kefu-{s}-{run_id}"
            env = {**common_env, "KEFU_METRICS_PORT": str(free_port()), **own_env.get(s, {})}
            volumes = []
            if s in WITH_DATA:
                data[s] = root / f"{s}-data"
                data[s].mkdir()
                shutil.chown(data[s], int(USER), int(USER))
                volumes += ["--volume", f"{data[s]}:/data"]
            if s in ("inference", "retrieval"):
                volumes += ["--volume", f"{models}:/models-custom:ro"]
            # On the host's network every service gets its own metrics port instead of 9090.
            podman(*run_args(name, env, "--hostname", f"kefu-{s}", *volumes, image(s)))
            containers[s] = name
            started[s] = time.monotonic()
        healthy: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(healthy) < len(SERVICES):
            for s, name in containers.items():
                if s in healthy:
                    continue
                state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
                assert state == "running", f"{s} is {state}: {podman('logs', name, check=False).stderr[-3000:]}"
                # The image's own HEALTHCHECK (GET /healthz on its metrics port): fails when there is none.
                if podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0:
                    healthy[s] = round(time.monotonic() - started[s], 1)
            assert time.monotonic() < deadline, f"not healthy after 300 s: {set(SERVICES) - set(healthy)}"
            time.sleep(1)
        base = f"http://127.0.0.1:{http_port}"
        while http(base, "GET", "/readyz", timeout=5)[0] != 200:
            assert time.monotonic() < deadline, http(base, "GET", "/readyz", timeout=5)
            time.sleep(0.5)
        yield Stack(containers, base, healthy, data)
    finally:
        for s, name in containers.items():
            (root / f"{s}.log").write_text(podman("logs", name, check=False).stdout
                                           + podman("logs", name, check=False).stderr)
            podman("rm", "--force", "--time", "10", name, check=False)
        nats.stop()


@pytest.mark.parametrize("name", SERVICES)
def test_image_runs_as_its_user_with_a_read_only_root(stack: Stack, name: str):
    inspect = json.loads(podman("image", "inspect", image(name)).stdout)[0]
    assert inspect["Config"]["User"] == USER
    assert "/healthz" in " ".join(inspect["Healthcheck"]["Test"])  # Docker's format keeps HEALTHCHECK
    ctr = stack.containers[name]
    assert json.loads(podman("inspect", ctr).stdout)[0]["HostConfig"]["ReadonlyRootfs"] is True
    assert podman("exec", ctr, "id", "-u").stdout.strip() == USER
    # The root filesystem refuses a write; /tmp takes one, and /data where it is a volume.
    probe = "import sys\nfor p in sys.argv[1:]:\n  try: open(p, 'w').close(); print(p, 'ok')\n  except OSError as e: print(p, e.strerror)"
    out = podman("exec", ctr, "python", "-c", probe, "/opt/kefu/probe", "/probe", "/tmp/probe", "/data/probe").stdout
    seen = dict(line.split(" ", 1) for line in out.splitlines())
    assert seen["/opt/kefu/probe"] == "Read-only file system" and seen["/probe"] == "Read-only file system"
    assert seen["/tmp/probe"] == "ok"
    assert seen["/data/probe"] == ("ok" if name in WITH_DATA else "Read-only file system")
    # Nothing of the container's own layer changed while the service ran but podman's own /etc entries
    # (the mount points of hosts, hostname and resolv.conf, made before the root went read-only).
    changed = set(podman("diff", ctr).stdout.split("\n")) - {""}
    assert {line.split()[1] for line in changed} <= {"/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}, changed


def test_models_come_from_the_mounted_volume(stack: Stack):
    # llama.cpp maps the GGUF file it loaded; the embedder says where it read its model.
    maps = podman("exec", stack.containers["inference"], "cat", "/proc/1/maps").stdout
    assert f"/models-custom/{DEFAULT_LLM.name}" in maps
    assert f"/models/{DEFAULT_LLM.name}" not in maps
    logs = podman("logs", stack.containers["retrieval"]).stdout + podman("logs", stack.containers["retrieval"]).stderr
    loaded = [json.loads(line) for line in logs.splitlines() if '"embedder loaded"' in line]
    assert loaded and loaded[0]["model"] == f"/models-custom/{DEFAULT_EMBED.name}"


def test_the_stack_from_images_answers_a_visitor(stack: Stack):
    st, body = http(stack.http, "PUT", "/v1/tenants/shop/documents/lamp",
                    {"title": "Desk lamp L2", "text": "The L2 desk lamp costs 129 yuan and has three brightness levels."},
                    token=ADMIN)
    assert st == 200, body
    st, body = http(stack.http, "POST", "/v1/tenants/shop/conversations", {})
    assert st == 201, body
    conv = json.loads(body)
    t0 = time.monotonic()
    st, body = http(stack.http, "POST", f"/v1/conversations/{conv['conversation_id']}/messages",
                    {"text": "How much is the L2 desk lamp?"}, token=conv["visitor_token"])
    first_answer_s = round(time.monotonic() - t0, 2)
    assert st == 200, body
    reply = json.loads(body)["reply"]
    assert "129" in reply["text"] and reply["citations"] == ["lamp"]
    # The gateway generated its signing key into its volume; retrieval keeps its index snapshots in its own.
    assert any(stack.data["gateway"].iterdir())

    sizes = json.loads(podman("images", "--format", "json").stdout)
    size_of = {n: i["Size"] for i in sizes for n in i.get("Names") or ()}
    out = ROOT / ".kefu" / "images" / f"run-{ARCH}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"healthy_s": stack.healthy_s, "first_answer_s": first_answer_s,
                               "image_mb": {s: round(size_of.get(image(s), 0) / 1e6) for s in SERVICES}}, indent=2))
    print(out.read_text())


def seconds_until_ok(container: str, metrics_port: int, path: str, within_s: float, every_s: float) -> float:
    """Seconds until the container's ``path`` on its metrics port answers 200, asked from this host; fails
    with the container's log after ``within_s``."""
    started = time.monotonic()
    while http(f"http://127.0.0.1:{metrics_port}", "GET", path, timeout=10)[0] != 200:
        logs = podman("logs", container, check=False)
        assert time.monotonic() - started < within_s, logs.stdout[-2000:] + logs.stderr[-2000:]
        time.sleep(every_s)
    return round(time.monotonic() - started, 1)


def test_arm64_gateway_runs_under_emulation(tmp_path: Path):
    arm64 = f"localhost/kefu/gateway:{version()}-arm64"
    if ARCH == "arm64":
        pytest.skip("this machine is arm64: the stack above ran the arm64 images")
    if podman("image", "exists", arm64, check=False).returncode != 0:
        pytest.skip(f"{arm64} not built (make images-binfmt; make images IMAGE_ARCH=arm64 IMAGE_SERVICES=gateway)")
    assert Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists(), "make images-binfmt"
    assert json.loads(podman("image", "inspect", arm64).stdout)[0]["Architecture"] == "arm64"
    name = f"kefu-gateway-arm64-{uuid.uuid4().hex[:8]}"
    metrics, http_port = free_port(), free_port()
    with NatsServer(tmp_path / "nats") as nats:
        env = {"KEFU_NATS_URL": nats.url, "KEFU_METRICS_HOST": "127.0.0.1", "KEFU_METRICS_PORT": str(metrics),
               "KEFU_HTTP_HOST": "127.0.0.1", "KEFU_HTTP_PORT": str(http_port), "KEFU_GRPC_HOST": "127.0.0.1",
               "KEFU_GRPC_PORT": str(free_port()), "KEFU_ADMIN_TOKEN": ADMIN}
        data = tmp_path / "data"
        data.mkdir()
        shutil.chown(data, int(USER), int(USER))
        podman(*run_args(name, env, "--volume", f"{data}:/data", arm64))
        try:
            assert podman("exec", name, "uname", "-m").stdout.strip() == "aarch64"
            # /healthz asked from here: under qemu on a busy machine the HEALTHCHECK's own Python takes
            # longer to start than its 3 s timeout (on an arm64 node it does not).
            healthy_s = seconds_until_ok(name, metrics, "/healthz", within_s=240, every_s=2)
            print(json.dumps({"arm64_gateway_healthy_s": healthy_s}))
        finally:
            podman("rm", "--force", "--time", "10", name, check=False)



async def generate_once(nats_url: str) -> tuple[list[llm_pb2.GenerateChunk], float]:
    """One short greedy generation through JetStream, as the dialogue service asks for it; its chunks and seconds."""
    bus = await Bus.connect([nats_url], "test")
    try:
        t0 = time.monotonic()
        async with bus.inbox() as (inbox, sub):
            job = llm_pb2.GenerateRequest(job_id=uuid.uuid4().hex, max_tokens=8, reply_inbox=inbox, temperature=0,
                                          deadline_ms=int((time.time() + 600) * 1000),
                                          messages=[llm_pb2.ChatMessage(role="user", content="Say hello.")])
            await bus.js.publish(LLM_GENERATE, job.SerializeToString())
            chunks: list[llm_pb2.GenerateChunk] = []
            while not chunks or not chunks[-1].done:  # heartbeats come while the emulated model works
                chunk = llm_pb2.GenerateChunk.FromString((await sub.next_msg(timeout=120)).data)
                if not chunk.heartbeat:
                    chunks.append(chunk)
        return chunks, round(time.monotonic() - t0, 1)
    finally:
        await bus.close()


@pytest.mark.timeout(1800)
def test_arm64_inference_generates_under_emulation(tmp_path: Path):
    arm64 = f"localhost/kefu/inference:{version()}-arm64"
    if ARCH == "arm64":
        pytest.skip("this machine is arm64: the stack above ran the arm64 images")
    if podman("image", "exists", arm64, check=False).returncode != 0:
        pytest.skip(f"{arm64} not built (make airgap-wheel-arm64 images-binfmt; "
                    "make images IMAGE_ARCH=arm64 IMAGE_SERVICES=inference IMAGE_WHEELS=.kefu/wheels)")
    assert Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists(), "make images-binfmt"
    assert json.loads(podman("image", "inspect", arm64).stdout)[0]["Architecture"] == "arm64"
    name = f"kefu-inference-arm64-{uuid.uuid4().hex[:8]}"
    metrics = free_port()
    # Emulated, the container would see this machine's x86 CPUs in /sys, where onnxruntime's cpuinfo (the
    # OCR, loaded at start) crashes; hidden, it takes its defaults (tools/images/build.sh does the same).
    no_cpus = tmp_path / "no-cpu-sysfs"
    no_cpus.mkdir()
    with NatsServer(tmp_path / "nats") as nats:
        env = {"KEFU_NATS_URL": nats.url, "KEFU_METRICS_HOST": "127.0.0.1", "KEFU_METRICS_PORT": str(metrics),
               "KEFU_LLM_THREADS": "2"}
        # The model baked into the image (/models), no volume.
        podman(*run_args(name, env, "--volume", f"{no_cpus}:/sys/devices/system/cpu:ro", arm64))
        try:
            assert podman("exec", name, "uname", "-m").stdout.strip() == "aarch64"
            # /readyz: the OCR and the model loaded, the job stream there (/healthz answers before).
            ready_s = seconds_until_ok(name, metrics, "/readyz", within_s=900, every_s=3)
            chunks, generate_s = asyncio.run(generate_once(nats.url))
            text = "".join(c.text for c in chunks)
            assert not chunks[-1].error_code, chunks[-1]
            assert chunks[-1].model == DEFAULT_LLM.name and text.strip(), chunks[-1]
            print(json.dumps({"arm64_inference_ready_s": ready_s, "arm64_inference_generate_s": generate_s,
                              "text": text}))
        finally:
            podman("rm", "--force", "--time", "10", name, check=False)
