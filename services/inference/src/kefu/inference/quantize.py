"""Re-quantize a GGUF model with llama.cpp's own quantizer (through llama-cpp-python), e.g. F16 to
Q4_K_M for a small CPU box, or Q8_0 for better answers where memory allows."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# The types worth offering (name -> llama.cpp file type); the K-quants fall back to a legacy type for
# tensors whose rows are not a multiple of 256, as llama.cpp's quantize tool does.
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "F16")


class QuantizeError(Exception):
    """The input is not a GGUF model llama.cpp can read, or the type is unknown."""


def quantize(source: Path, target: Path, type_name: str, *, threads: int | None = None) -> Path:
    """Write ``source`` quantized to ``type_name`` (one of :data:`TYPES`) as ``target``; an already
    quantized model is re-quantized. The file appears only when complete.

    Raises:
        QuantizeError: unknown type, unreadable source, or llama.cpp refused.
    """
    import llama_cpp

    name = type_name.upper()
    if name not in TYPES:
        raise QuantizeError(f"unknown type {type_name!r}; one of {', '.join(TYPES)}")
    if not source.is_file():
        raise QuantizeError(f"{source} is not a file")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise QuantizeError(f"{source} is not a GGUF model")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp could not quantize {source} to {name} (code {code})")
    partial.rename(target)
    return target
