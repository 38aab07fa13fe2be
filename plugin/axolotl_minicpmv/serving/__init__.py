"""Serving MiniCPM-V 2.0 outside transformers (vLLM: `serving.vllm`)."""
