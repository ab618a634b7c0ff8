"""OCR of visitor images with RapidOCR (PP-OCRv4 Chinese + English, models inside the wheel)."""

from __future__ import annotations

import threading

import numpy as np


class OcrEngine:
    """Loaded once at start-up; one recognition at a time (it uses every core it is given)."""

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()
        self.lock = threading.Lock()

    def recognize(self, image: bytes) -> tuple[str, float]:
        """(text, mean confidence) of ``image`` (PNG or JPEG bytes); lines top to bottom.

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
            return "", 0.0
        # Reading order: by the top edge of each box, then left to right.
        lines = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 10), min(p[0] for p in r[0])))
        text = "\n".join(str(r[1]) for r in lines)
        return text, float(np.mean([float(r[2]) for r in lines]))
