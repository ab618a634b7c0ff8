"""docker-compose.yml validated as `docker compose config` would (tools/compose_config.py: the Compose
Specification through the compose_spec library, then undefined services and volumes), and kefu's rules."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import compose_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = (ROOT / "docker-compose.yml").read_text()


def test_compose_file_is_valid():
    run = subprocess.run([sys.executable, str(ROOT / "tools/compose_config.py"), str(ROOT / "docker-compose.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert compose_config.problems(COMPOSE, ROOT) == []


def test_services_health_volumes_and_models():
    spec = compose_config.resolve(COMPOSE)
    services = spec["services"]
    assert set(services) == {"nats", *compose_config.KEFU_SERVICES}
    for name in compose_config.KEFU_SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == f"services/{name}/Dockerfile"
        assert "9090/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["KEFU_NATS_URL"] == "nats://nats:4222"
        assert svc["tmpfs"] == ["/tmp"]
    # What writes /data has a volume there; models of your own come read-only from the models volume.
    for name in ("gateway", "retrieval", "plugins"):
        assert any(v.endswith(":/data") for v in services[name]["volumes"]), name
    for name in ("retrieval", "inference"):
        assert "models:/models-custom:ro" in services[name]["volumes"]
    assert "nats-data:/data" in services["nats"]["volumes"]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("read_only: true", "read_only: yes please", "not a valid Compose file"),
    ("interval: 10s", "interval: 10 parsecs", "not a valid Compose file"),
    ("[gateway-data:/data]", "[gateway-dat:/data]", "undefined volume gateway-dat"),
    ("    depends_on:\n    nats:", "    depends_on:\n    natz:", "undefined service natz"),
    ("'http://127.0.0.1:9090/healthz'", "'http://127.0.0.1:9090/'", "no health check on /healthz"),
    ("dockerfile: services/plugins/Dockerfile", "dockerfile: services/plugin/Dockerfile", "no Dockerfile"),
    ('command: ["-js", ', 'command: [', "JetStream"),
])
def test_a_broken_file_is_refused(old, new, expected):
    old = old.replace("    depends_on:\n    nats:", "  depends_on:\n    nats:")
    new = new.replace("    depends_on:\n    natz:", "  depends_on:\n    natz:")
    assert old in COMPOSE
    found = compose_config.problems(COMPOSE.replace(old, new, 1), ROOT)
    assert any(expected in p for p in found), found


def test_every_service_gets_the_master_key_of_the_env_file():
    """Encryption at rest is one line in .env (KEFU_MASTER_KEY, which compose substitutes) for every service,
    the same key for all; unset, it is empty and encryption is off."""
    services = compose_config.resolve(COMPOSE)["services"]
    for name in compose_config.KEFU_SERVICES:
        assert services[name]["environment"]["KEFU_MASTER_KEY"] == "${KEFU_MASTER_KEY:-}", name
    assert "KEFU_MASTER_KEY" not in services["nats"].get("environment", {})
