"""`kefu kb import` and `kefu kb search` against the running services: mixed files in, answers out."""

import argparse
import asyncio
import functools
import json
import urllib.parse
import zlib

import pytest

from kefu.cli.client import Client
from kefu.cli.kbimport import documents, import_paths
from kefu.cli.main import kb_search

pytestmark = [pytest.mark.integration, pytest.mark.model]


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica (enough for a text extractor)."""
    stream = zlib.compress(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "kb"
    d.mkdir()
    (d / "shipping.md").write_text("# 配送说明\n\n江浙沪地区下单后 24 小时内发货，其他地区 48 小时内发货。\n")
    (d / "hours.txt").write_text("Our Shenzhen store opens at 10:00 and closes at 21:00 every day.\n")
    (d / "lamp.html").write_text("<html><head><title>Desk lamp L3</title><style>p{}</style></head>"
                                 "<body><h1>L3</h1><p>The L3 desk lamp costs 159 yuan.</p><script>x()</script></body></html>")
    (d / "faq.csv").write_text("question,answer\n发票怎么开？,在订单详情页点击申请发票即可。\nCan I pay with Alipay?,Yes we accept Alipay and WeChat Pay.\n")
    (d / "products.json").write_text(json.dumps([{"doc_id": "rv-500", "title": "RV-500", "text": "The RV-500 robot vacuum runs for 180 minutes."}]))
    (d / "more.jsonl").write_text(json.dumps({"doc_id": "eb-20", "title": "EB-20", "text": "EB-20 earbuds last 30 hours with the case."}) + "\n")
    (d / "router.pdf").write_bytes(tiny_pdf("Hold the AX3000-R reset button for 10 seconds to restore factory settings."))
    (d / "notes.docx").write_bytes(b"PK\x03\x04 not supported")
    (d / "broken.txt").write_bytes(b"\xff\xfe\xfa invalid utf-8")
    return d


def test_documents_from_each_format(folder):
    assert next(documents(folder / "shipping.md"))["title"] == "配送说明"
    html = next(documents(folder / "lamp.html"))
    assert html["title"] == "Desk lamp L3" and "159 yuan" in html["text"] and "x()" not in html["text"]
    faq = list(documents(folder / "faq.csv"))
    assert [f["title"] for f in faq] == ["发票怎么开？", "Can I pay with Alipay?"]
    assert all(f["metadata"]["kind"] == "faq" for f in faq)
    assert "AX3000-R reset button" in next(documents(folder / "router.pdf"))["text"]
    with pytest.raises(ValueError, match="unsupported"):
        next(documents(folder / "notes.docx"))
    with pytest.raises(UnicodeDecodeError):
        next(documents(folder / "broken.txt"))


# The services run on this test's event loop: the CLI's blocking HTTP calls go to a thread.


async def test_import_a_mixed_folder_then_search_in_both_languages(stack, folder, unique, capsys):
    tenant = unique("imp")
    client = Client(stack.http, stack.admin)
    code = await asyncio.to_thread(import_paths, client, tenant, [folder])
    out, err = capsys.readouterr()
    assert code == 1  # the broken file is reported, and the exit status says so
    assert "8 documents imported, 1 failed" in out and "broken.txt" in err
    assert (folder / "notes.docx").name not in out  # a folder import only takes the supported types

    async def search(q):
        path = f"/v1/tenants/{tenant}/search?" + urllib.parse.urlencode({"q": q, "k": 3})
        status, body = await asyncio.to_thread(client.call, "GET", path)
        assert status == 200
        return [h["doc_id"] for h in body["hits"]]

    assert (await search("江浙沪多久发货"))[0] == "shipping"
    assert (await search("when does the Shenzhen store close"))[0] == "hours"
    assert (await search("如何申请发票"))[0] == "faq-1"
    assert (await search("how do I factory reset the AX3000-R"))[0] == "router"
    assert (await search("RV-500 battery time"))[0] == "rv-500"

    args = argparse.Namespace(query="EB-20 battery life", tenant=tenant, k=2, json=False)
    assert await asyncio.to_thread(kb_search, client, args) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("1. "))
    assert "eb-20" in first


async def test_price_change_is_searchable_immediately(stack, unique):
    tenant = unique("price")
    client = Client(stack.http, stack.admin)
    call = functools.partial(asyncio.to_thread, client.call)
    doc = {"title": "Kettle K7", "text": "The K7 kettle costs 259 yuan."}
    assert (await call("PUT", f"/v1/tenants/{tenant}/documents/k7", doc))[0] == 200
    doc["text"] = "The K7 kettle costs 239 yuan."
    assert (await call("PUT", f"/v1/tenants/{tenant}/documents/k7", doc))[0] == 200
    status, body = await call("GET", f"/v1/tenants/{tenant}/search?q=K7%20price&k=5")
    assert [h["text"] for h in body["hits"]] == ["The K7 kettle costs 239 yuan."]


async def test_bad_documents_are_refused_and_change_nothing(stack, unique):
    tenant = unique("bad")
    client = Client(stack.http, stack.admin)
    call = functools.partial(asyncio.to_thread, client.call)
    assert (await call("PUT", f"/v1/tenants/{tenant}/documents/d", {"title": "t", "text": "kept"}))[0] == 200
    status, body = await call("PUT", f"/v1/tenants/{tenant}/documents/d", {"title": "t", "text": "   "})
    assert status == 400 and body["error"]["code"] == "invalid_field"
    status, body = await call("PUT", f"/v1/tenants/{tenant}/documents/d", {"title": "t", "text": "x" * 50_000_000})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    status, body = await call("GET", f"/v1/tenants/{tenant}/search?q=kept&k=5")
    assert [h["text"] for h in body["hits"]] == ["kept"]
