"""OCR of a generated 1080p screenshot (Chinese and English, drawn with a real CJK font) by the real
RapidOCR models, in process and through the inference service on the bus."""

import io

import pytest

from kefu.inference.ocr import OcrEngine
from kefu.proto.bus.v1 import llm_pb2
from kefu.shared.bus import ensure_object_store
from kefu.shared.errors import KefuError
from kefu.shared.streams import media_store
from kefu.shared.testing import SCREENSHOT_LINES, char_accuracy, screenshot

pytestmark = [pytest.mark.model]


@pytest.fixture(scope="module")
def engine() -> OcrEngine:
    return OcrEngine()


def test_a_1080p_screenshot_is_read_with_at_least_95_percent_of_its_characters(engine):
    found = engine.recognize(screenshot())
    assert char_accuracy("\n".join(SCREENSHOT_LINES), found.text) >= 0.95, found.text
    assert "20261124001" in found.text and "400-820-6688" in found.text
    assert len(found.lines) == len(SCREENSHOT_LINES) and 0.9 <= found.confidence <= 1.0
    # Boxes: four corners each, top to bottom in reading order, inside the 1920x1080 frame.
    tops = [min(y for _, y in line.box) for line in found.lines]
    assert tops == sorted(tops) and all(len(line.box) == 4 for line in found.lines)
    assert all(0 <= x <= 1920 and 0 <= y <= 1080 for line in found.lines for x, y in line.box)


def test_char_accuracy_counts_every_edit():
    assert char_accuracy("订单号 123", "订单号123") == 1.0
    assert char_accuracy("abcd", "abxd") == 0.75 and char_accuracy("abcd", "") == 0.0


def test_an_image_without_text_and_bytes_that_are_no_image(engine):
    from PIL import Image

    blank = io.BytesIO()
    Image.new("RGB", (640, 360), "white").save(blank, format="PNG")
    assert engine.recognize(blank.getvalue()).text == ""
    with pytest.raises(ValueError, match="not a readable"):
        engine.recognize(b"\x89PNG\r\n\x1a\n garbage")


@pytest.mark.integration
async def test_ocr_over_the_bus_returns_lines_with_boxes(stack, bus, unique):
    media = await ensure_object_store(bus.js, media_store())
    name = unique("shot")
    await media.put(name, screenshot())
    reply = await bus.request("kefu.inference.ocr", llm_pb2.OcrRequest(media_id=name), llm_pb2.OcrReply, timeout=60)
    assert "SF1234567890" in reply.text and len(reply.lines) == len(SCREENSHOT_LINES)
    assert all(len(line.box) == 8 for line in reply.lines)
    with pytest.raises(KefuError) as missing:
        await bus.request("kefu.inference.ocr", llm_pb2.OcrRequest(media_id=unique("none")), llm_pb2.OcrReply)
    assert missing.value.code == "not_found"
