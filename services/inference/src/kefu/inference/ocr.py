"""OCR of visitor images with RapidOCR (PP-OCRv4 Chinese + English, models inside the wheel)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Line:
    text: str
    confidence: float
    # Four corners, clockwise from the top left: ((x1, y1), ..., (x4, y4)).
    box: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Recognition:
    """Lines in reading order, their text joined with newlines, and the mean confidence."""

    text: str
    confidence: float
    lines: list[Line] = field(default_factory=list)


class OcrEngine:
    """Loaded once at start-up; one recognition at a time (it uses every core it is given)."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        self.lock = threading.Lock()

    def recognize(self, image: bytes) -> Recognition:
        """The text of ``image`` (PNG or JPEG bytes), lines top to bottom, with boxes and confidences.

        Raises:
            ValueError: the bytes are not an image the decoder can read.
        """
        import cv2

        try:
            pixels = cv2.imdecode(np.frombuffer(image, dtype=np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            pixels = None
        if pixels is None:
            raise ValueError("not a readable PNG or JPEG image")
        with self.lock:
            result, _ = self.engine(pixels)
        if not result:
            return Recognition("", 0.0)
        # Reading order: by the top edge of each box, then left to right.
        ordered = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 10), min(p[0] for p in r[0])))
        lines = [Line(str(r[1]), float(r[2]), tuple((float(x), float(y)) for x, y in r[0])) for r in ordered]
        return Recognition("\n".join(line.text for line in lines), float(np.mean([line.confidence for line in lines])),
                           lines)
