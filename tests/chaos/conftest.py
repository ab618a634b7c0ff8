"""Fixtures of the chaos suite: ``chaos``, the stack of tests/chaos/chaos_harness.py (one per run of the
directory, started once: its processes take a while to load their models), and ``stack``, the same with every
replica running."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the scenarios import the harness by name

from chaos_harness import LAMP, ChaosStack, put_document  # noqa: E402


@pytest.fixture(scope="package")
async def chaos(tmp_path_factory: pytest.TempPathFactory, models_data_dir: Path) -> AsyncIterator[ChaosStack]:
    stack = ChaosStack(tmp_path_factory.mktemp("chaos"), models_data_dir)
    try:
        await stack.up()
        async with aiohttp.ClientSession() as s:
            await put_document(s, stack.gateways, "lamp", LAMP)
        yield stack
    finally:
        await stack.close()


@pytest.fixture
async def stack(chaos: ChaosStack) -> ChaosStack:
    """The chaos stack, every replica running (restarted where an earlier scenario left one down)."""
    await chaos.revive()
    return chaos


