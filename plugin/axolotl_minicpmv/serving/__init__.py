"""Serving MiniCPM-V 2.0: `minicpmv-serve` (this package), an OpenAI-compatible chat completions server with request
batching and a chat page, and the vLLM plugin for serving at scale (`serving.vllm`).

`api.create_app` builds the FastAPI app, `scheduler.Scheduler` batches requests through `generate_answers`,
`protocol` turns request bodies into conversations (or OpenAI-style errors), `images` opens pictures safely.
Tests: tests/test_serve.py (API, batching, limits), tests/test_serve_page.py (the page in Chromium), tests/test_vllm.py.
"""
