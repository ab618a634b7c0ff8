"""KEFU_SLOTS_MODEL: the model proposes slots as JSON (schema-constrained generation on the real bundled
model), and only what the visitor's text bears out is kept, as SlotSet events."""

import asyncio

import pytest

from kefu.dialogue.app import DialogueService, DialogueSettings
from kefu.inference.app import InferenceService, InferenceSettings
from kefu.proto.bus.v1 import turn_pb2
from kefu.retrieval.app import RetrievalService, RetrievalSettings
from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import start_in_background

pytestmark = [pytest.mark.integration, pytest.mark.model]


async def test_model_slots_fill_what_the_rules_miss_and_nothing_invented(tmp_path, models_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_data_dir / "models")  # its own state, the session's models
    with NatsServer(tmp_path / "js") as nats:
        common = {"nats_url": nats.url, "data_dir": data, "log_level": "warning"}
        stop = asyncio.Event()
        tasks = [await start_in_background(InferenceService(InferenceSettings(**common, ocr_enabled=False)), stop),
                 await start_in_background(RetrievalService(RetrievalSettings(**common)), stop),
                 await start_in_background(DialogueService(DialogueSettings(**common, slots_model=True)), stop)]
        bus = await Bus.connect([nats.url], "test")
        try:
            start = await bus.request("kefu.dialogue.start", turn_pb2.StartConversationRequest(tenant="shop"),
                                      turn_pb2.StartConversationReply)
            text = "My Aurora blender from order 20261124001 has not arrived yet."
            await bus.request("kefu.dialogue.turn", turn_pb2.TurnRequest(conversation_id=start.conversation_id,
                                                                         text=text, turn_id="t1"),
                              turn_pb2.TurnReply, timeout=60)
            state = await bus.request("kefu.dialogue.get",
                                      turn_pb2.GetStateRequest(conversation_id=start.conversation_id),
                                      turn_pb2.ConversationState)
            # The model read the product and the order number; it also offered a phone number that the
            # message does not have, which was dropped.
            assert dict(state.slots) == {"product": "Aurora Blender", "order_id": "20261124001"}
            assert all(value.casefold() in text.casefold() for value in state.slots.values())
        finally:
            await bus.close()
            stop.set()
            await asyncio.gather(*tasks)
