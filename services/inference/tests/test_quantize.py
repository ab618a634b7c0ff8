"""kefu models quantize: llama.cpp's quantizer re-quantizes the bundled model, and the result loads
and answers."""

import pytest

from kefu.cli.main import main
from kefu.inference.backend import GenerationParams, LlamaCppBackend
from kefu.inference.quantize import QuantizeError, quantize
from kefu.shared.models import DEFAULT_LLM, resolve

pytestmark = [pytest.mark.model]


def test_requantized_model_loads_and_answers(models_data_dir, tmp_path):
    source = resolve(DEFAULT_LLM, models_data_dir)
    target = quantize(source, tmp_path / "q8.gguf", "q8_0")
    assert target.read_bytes()[:4] == b"GGUF" and target.stat().st_size > source.stat().st_size  # 8 bits > 4
    backend = LlamaCppBackend(target, n_ctx=256)
    assert backend.llm.metadata["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    pieces = list(backend.generate([{"role": "user", "content": "Say hello."}], GenerationParams(max_tokens=8),
                                   lambda: False))
    assert "".join(p.text for p in pieces).strip()


def test_bad_inputs_are_refused_and_leave_no_file(tmp_path, capsys):
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"not a model")
    with pytest.raises(QuantizeError, match="not a GGUF"):
        quantize(not_gguf, tmp_path / "out.gguf", "Q4_K_M")
    with pytest.raises(QuantizeError, match="unknown type"):
        quantize(not_gguf, tmp_path / "out.gguf", "Q3_FANCY")
    assert main(["models", "quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "out.gguf")]) == 1
    assert "is not a file" in capsys.readouterr().err and not list(tmp_path.glob("*out.gguf*"))
