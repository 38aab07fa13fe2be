"""`serve()`: load the model (base, adapter or merged export) and run the API with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

from ..inference.chat_helper import pick_device, resolve_dtype
from ..model.processing_minicpmv import MiniCPMVProcessor
from ..weights.loading import load_model
from .api import ServerSettings, create_app
from .scheduler import Scheduler

logger = logging.getLogger("axolotl_minicpmv.serving")


def build_app(
    model_path: str,
    adapter: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    **settings,
):
    device = device or pick_device()
    torch_dtype = resolve_dtype(dtype, device)
    model = load_model(model_path, adapter=adapter, dtype=torch_dtype).to(device).eval()
    processor = MiniCPMVProcessor.from_pretrained(model_path)
    name = settings.pop("model_name", None) or Path(str(adapter or model_path)).name
    server_settings = ServerSettings(model_name=name, **settings)
    scheduler = Scheduler(model, processor, max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=server_settings.max_model_len)
    scheduler.warm_up()
    logger.info(f"serving {model_path}{f' + {adapter}' if adapter else ''} as {name!r} on {device} ({torch_dtype})")
    return create_app(scheduler, server_settings)


def serve(model_path: str, adapter: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(model_path, adapter, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
