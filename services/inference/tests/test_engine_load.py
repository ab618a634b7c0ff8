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
