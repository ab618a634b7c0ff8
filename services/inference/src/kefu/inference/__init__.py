"""kefu inference service: local GGUF models via llama-cpp-python, streamed to the requester's inbox."""
