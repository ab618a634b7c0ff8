"""The engine loads safely on every CPU: AMX weight buffers (which crash llama.cpp on some Sapphire
Rapids machines, ggml-org/llama.cpp#20824) are not used where the CPU has AMX."""

import llama_cpp.llama_cpp as capi
import pytest

from kefu.inference.backend import cpu_has_amx, open_llama
from kefu.shared.models import models_dir

pytestmark = pytest.mark.model


def test_a_long_prompt_runs_and_amx_buffers_are_off_where_the_cpu_has_amx(models_data_dir):
    model = next(models_dir(models_data_dir).glob("*.gguf"))
    llm = open_llama(str(model), n_ctx=1024, n_threads=2, verbose=False)
    assert capi.llama_model_default_params().use_extra_bufts is (not cpu_has_amx())
    assert llm.model_params.use_extra_bufts is (not cpu_has_amx())
    # A prompt of several hundred tokens: the batched matrix products are where the AMX path crashed.
    prompt = "The warranty of the X100 phone is two years. " * 60
    out = llm.create_completion(prompt + "Q: How long is the warranty?\nA:", max_tokens=8, temperature=0)
    assert out["usage"]["prompt_tokens"] > 500
    assert out["choices"][0]["text"]


def test_gpu_layers_reach_the_engine_and_a_cpu_build_still_answers(models_data_dir, monkeypatch):
    """KEFU_LLM_GPU_LAYERS (the chart's GPU example sets it) is what the engine is opened with; on this
    CPU-only build llama.cpp keeps the layers on the CPU and answers all the same."""
    from kefu.inference.app import InferenceSettings
    from kefu.inference.backend import LlamaCppBackend

    monkeypatch.setenv("KEFU_LLM_GPU_LAYERS", "-1")
    settings = InferenceSettings()
    assert settings.llm_gpu_layers == -1
    model = next(models_dir(models_data_dir).glob("*.gguf"))
    backend = LlamaCppBackend(model, n_ctx=512, threads=2, gpu_layers=settings.llm_gpu_layers)
    assert backend.llm.model_params.n_gpu_layers == 2**31 - 1  # llama-cpp-python's "all layers"
    out = backend.llm.create_completion("Q: What colour is the sky?\nA:", max_tokens=4, temperature=0)
    assert out["choices"][0]["text"]
    monkeypatch.setenv("KEFU_LLM_GPU_LAYERS", "-2")
    with pytest.raises(ValueError):
        InferenceSettings()
