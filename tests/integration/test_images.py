"""POST /v1/conversations/{cid}/images: the text of a screenshot joins the conversation (real OCR)."""

import io

import aiohttp
import pytest
from PIL import Image, ImageDraw, ImageFont

pytestmark = [pytest.mark.integration, pytest.mark.model]


def picture(text: str, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (1000, 120), "white")
    ImageDraw.Draw(img).text((20, 30), text, fill="black", font=ImageFont.load_default(size=40))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


async def start(session, stack, tenant):
    async with session.post(f"{stack.http}/v1/tenants/{tenant}/conversations", json={}) as r:
        return await r.json()


async def upload(session, stack, cid, token, data: bytes, field: str = "file", name: str = "shot.png"):
    form = aiohttp.FormData()
    form.add_field(field, data, filename=name, content_type="image/png")
    async with session.post(f"{stack.http}/v1/conversations/{cid}/images", data=form,
                            headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def test_screenshot_text_joins_the_conversation(stack, unique):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        conv = await start(s, stack, unique("img"))
        cid, tok = conv["conversation_id"], conv["visitor_token"]
        st, js = await upload(s, stack, cid, tok, picture("Order KF20260301123456 not delivered"))
        assert st == 200 and js["seq"] == 1 and "KF20260301123456" in js["text"].replace(" ", "")
        st, js = await upload(s, stack, cid, tok, picture("Refund please", "JPEG"), name="shot.jpg")
        assert st == 200 and "refund" in js["text"].lower()
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {tok}"}) as r:
            state = await r.json()
        assert [t["source"] for t in state["turns"]] == ["ocr", "ocr"]
        assert state["slots"]["order_id"] == "KF20260301123456"  # remembered like a typed order number


async def test_bad_uploads_get_typed_errors(stack, unique):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        conv = await start(s, stack, unique("badimg"))
        cid, tok = conv["conversation_id"], conv["visitor_token"]
        st, js = await upload(s, stack, cid, tok, b"%PDF-1.4 not an image")
        assert st == 400 and js["error"]["code"] == "invalid_image"
        st, js = await upload(s, stack, cid, tok, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)  # header, no picture
        assert st == 400 and js["error"]["code"] == "invalid_image", js
        st, js = await upload(s, stack, cid, tok, picture("x"), field="photo")
        assert st == 400 and js["error"]["code"] == "missing_field"
        st, js = await upload(s, stack, cid, tok, b"\x89PNG\r\n\x1a\n" + b"\x00" * (10 * 1024 * 1024 + 1))
        assert st == 413
        other = await start(s, stack, unique("badimg"))
        st, js = await upload(s, stack, cid, other["visitor_token"], picture("x"))
        assert st == 403
        async with s.post(f"{stack.http}/v1/conversations/{cid}/images", data=b"raw",
                          headers={"Authorization": f"Bearer {tok}", "Content-Type": "image/png"}) as r:
            assert r.status == 400
        async with s.get(f"{stack.http}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {tok}"}) as r:
            assert (await r.json())["turns"] == []  # nothing half-added
