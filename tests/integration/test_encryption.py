"""Encryption at rest, end to end: the session stack runs with KEFU_MASTER_KEY (see conftest.py). After
conversations in Chinese and English, a handoff and a screenshot upload, no message text and no image
byte is found in any file of the nats-server's JetStream store, and everything reads back."""

import asyncio
import os
import uuid
from pathlib import Path

import aiohttp
import pytest
from nats.js.api import StorageType, StreamConfig

from kefu.proto.bus.v1 import events_pb2, turn_pb2
from kefu.shared.crypto import is_sealed
from kefu.shared.streams import STREAM_CONV, conv_subject, handoff_context, handoffs_kv, media_store
from kefu.shared.testing import screenshot

pytestmark = [pytest.mark.integration, pytest.mark.model]


def found_in_store(store: Path, needles: list[bytes]) -> set[bytes]:
    """The needles that occur in any file under ``store`` (as bytes: UTF-8 text, image slices)."""
    hits = set()
    for root, _, files in os.walk(store):  # files come and go meanwhile (work queues, removed streams)
        for name in files:
            try:
                data = (Path(root) / name).read_bytes()
            except OSError:
                continue
            hits |= {n for n in needles if n in data}
    return hits


async def wait_until_found(store: Path, needles: list[bytes], timeout: float = 10.0) -> set[bytes]:
    deadline = asyncio.get_running_loop().time() + timeout
    while (hits := found_in_store(store, needles)) != set(needles):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    return hits


async def test_no_plaintext_in_the_jetstream_store_and_all_reads_back(stack, nats_server, bus, unique):
    marker = uuid.uuid4().hex[:10]
    english = f"My parcel {marker} never arrived and the courier stopped answering"
    chinese = f"紫色长颈鹿快递单{marker}一直没有送到，麻烦帮我查一下物流"
    shot_line = f"Order ZX{int(marker, 16) % 10**10:010d} waiting"
    image = screenshot(("订单详情 Order details", shot_line), size=(1280, 360))
    tenant = unique("sealed")
    store = Path(nats_server.store_dir)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        async with s.post(f"{stack.http}/v1/tenants/{tenant}/conversations", json={}) as r:
            conv = await r.json()
        cid, auth = conv["conversation_id"], {"Authorization": f"Bearer {conv['visitor_token']}"}
        replies = []
        for text in (english, chinese, "转人工"):
            async with s.post(f"{stack.http}/v1/conversations/{cid}/messages", json={"text": text}, headers=auth) as r:
                assert r.status == 200, await r.text()
                replies.append((await r.json())["reply"])
        assert replies[-1]["source"] == "handoff"
        form = aiohttp.FormData()
        form.add_field("file", image, filename="shot.png", content_type="image/png")
        async with s.post(f"{stack.http}/v1/conversations/{cid}/images", data=form, headers=auth) as r:
            assert r.status == 200, await r.text()
            ocr = await r.json()
        assert shot_line.split()[1] in ocr["text"].replace(" ", "")  # inference opened the sealed image

        # Everything reads back: the state (cached and folded anew from the log) and time travel.
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers=auth) as r:
            state = await r.json()
        async with s.get(f"{stack.http}/v1/conversations/{cid}/state?at_seq=2",
                         headers={"Authorization": f"Bearer {stack.admin}"}) as r:
            early = await r.json()
    texts = [t["text"] for t in state["turns"]]
    assert texts[0] == english and chinese in texts and "转人工" in texts and ocr["text"] in texts
    assert [t["text"] for t in state["turns"] if t["role"] == "bot"][:2] == [replies[0]["text"], replies[1]["text"]]
    assert [t["text"] for t in early["turns"]] == [english, replies[0]["text"]]
    folded = await stack.services["dialogue"].store.load(cid, verify=True)
    assert [t.text for t in folded.turns] == texts

    # What is stored is sealed: the event bodies, the handoff queue entry (it quotes the visitor), the image.
    last = await bus.js.get_last_msg(STREAM_CONV, conv_subject(tenant, cid))
    assert events_pb2.Event.FromString(last.data).WhichOneof("body") == "sealed"
    handoffs = await bus.js.key_value(handoffs_kv().bucket)
    entry = await handoffs.get(cid)
    assert is_sealed(entry.value)
    notice = turn_pb2.HandoffNotice.FromString(
        await stack.services["dialogue"].store.keyring.open(entry.value, handoff_context(cid)))
    assert english in notice.summary or chinese in notice.summary
    media = await bus.js.object_store(media_store().bucket)
    names = [o.name for o in await media.list() if o.name.startswith(cid)]
    stored = (await media.get(names[0])).data
    assert is_sealed(stored) and image[200:264] not in stored

    # The grep: none of it in the store's files, in any encoding we wrote it.
    needles = [english.encode(), chinese.encode(), "紫色长颈鹿快递单".encode(), f"parcel {marker}".encode(),
               *(image[i:i + 48] for i in range(100, len(image) - 48, max(1, len(image) // 8)))]
    if len(ocr["text"]) >= 8:
        needles.append(ocr["text"].encode())

    # A control that the grep sees what JetStream writes: the same kind of text, stored in clear elsewhere.
    control = f"control {marker} 紫色长颈鹿对照组 {uuid.uuid4().hex}"
    stream = unique("PLAIN")
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.x"], storage=StorageType.FILE))
    await bus.js.publish(f"{stream}.x", control.encode())
    assert await wait_until_found(store, [control.encode()]) == {control.encode()}
    await bus.js.delete_stream(stream)

    assert found_in_store(store, needles) == set()
