"""Fixtures shared by every test directory: the five services running in-process on the test
nats-server, with the real bundled models (loaded once per session)."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kefu.shared.logging import configure_logging
from kefu.shared.models import models_dir, pull
from kefu.shared.service import start_in_background

ROOT = Path(__file__).parent
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
# The session stack runs with encryption at rest on, so every test that goes through it goes through
# sealing and opening too (tests/integration/test_encryption.py checks the store holds no plaintext).
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="session")
def models_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose models/ holds the real default models (hard links to the installed packages)."""
    data = tmp_path_factory.mktemp("kefu-data")
    pull(models_dir(data))
    return data


@dataclass
class InprocStack:
    services: dict[str, object]
    nats_url: str
    data_dir: Path
    http: str
    grpc: str
    admin: str


@pytest.fixture(scope="session")
async def stack(nats_url: str, models_data_dir: Path) -> AsyncIterator[InprocStack]:
    """gateway, dialogue, retrieval, inference and plugins as asyncio tasks in the test process."""
    from kefu.dialogue.app import DialogueService, DialogueSettings
    from kefu.gateway.app import GatewayService, GatewaySettings
    from kefu.inference.app import InferenceService, InferenceSettings
    from kefu.plugins.app import PluginsService, PluginsSettings
    from kefu.retrieval.app import RetrievalService, RetrievalSettings

    os.environ["KEFU_ADMIN_TOKEN"] = ADMIN_TOKEN
    # Also for the replicas tests start beside the stack: one deployment, one master key.
    os.environ["KEFU_MASTER_KEY"] = MASTER_KEY
    configure_logging("tests", "warning", "console")
    common = {"nats_url": nats_url, "data_dir": models_data_dir, "log_level": "warning", "master_key": MASTER_KEY}
    services = {
        "inference": InferenceService(InferenceSettings(**common)),
        "retrieval": RetrievalService(RetrievalSettings(**common)),
        "dialogue": DialogueService(DialogueSettings(**common)),
        "plugins": PluginsService(PluginsSettings(**common)),
        "gateway": GatewayService(GatewaySettings(**common, http_port=0, grpc_port=0,
                                                  rate_messages_per_second=1000, rate_messages_burst=1000,
                                                  rate_ip_messages_per_second=1000, rate_ip_messages_burst=1000,
                                                  rate_logins_burst=1000, rate_account_logins_burst=1000)),
    }
    stop = asyncio.Event()
    tasks = await asyncio.gather(*(start_in_background(svc, stop) for svc in services.values()))
    gw = services["gateway"]
    yield InprocStack(services, nats_url, models_data_dir, f"http://127.0.0.1:{gw.http_port}",  # type: ignore[attr-defined]
                      f"127.0.0.1:{gw.grpc_port}", ADMIN_TOKEN)  # type: ignore[attr-defined]
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
