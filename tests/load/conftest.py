"""The stack of bench/load.py (nats-server, retrieval and plugins as their own processes; gateway, dialogue
and inference replicas started by each test as it needs them), started once for tests/load."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.load import Stack  # noqa: E402


@pytest.fixture(scope="package")
async def load_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("load")) as stack:
        yield stack
