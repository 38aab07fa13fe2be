"""`minicpmv_eval_generate: N`: at each evaluation, greedy answers for the first N eval samples, scored and logged
as `eval_exact` and `eval_rouge_l` in the same log entry as `eval_loss` (so every Axolotl logger gets them).

The answers are `minicpmv-predict`'s (integration/predict.py: the last assistant turn of each sample, greedy, as
`chat(sampling=False, num_beams=1)`). Tested through the real Axolotl CLI in tests/test_predict.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pyarrow.parquet as pq
from axolotl.utils.logging import get_logger
from transformers import TrainerCallback

from ..model.processing_minicpmv import MiniCPMVProcessor
from .args import MiniCPMVArgs, cfg_value
from .data import row_images
from .predict import predict, requests_from_samples

LOG = get_logger(__name__)
METRICS = ("exact", "rouge_l")


class EvalGenerateCallback(TrainerCallback):
    """Adds `eval_exact` / `eval_rouge_l` to the log entry that holds `eval_loss`.

    It must run before the loggers' callbacks (the printer, tensorboard, wandb): `add_eval_generate` puts it first.
    """

    def __init__(
        self, requests, processor: MiniCPMVProcessor, max_new_tokens: int, batch_size: int, autocast: Callable = contextlib.nullcontext
    ):
        self.requests = requests
        self.autocast = autocast  # the trainer's mixed precision: a run without DeepSpeed trains float32 weights (precision.py)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "eval_loss" not in logs or model is None:
            return
        # generate(), not FastDecoder: its compiled step holds the weights of the moment it was compiled
        # (and would compile again for minutes), while training changes them between evaluations.
        with self.autocast():
            rows = list(
                predict(
                    model,
                    self.processor,
                    self.requests,
                    batch_size=self.batch_size,
                    max_new_tokens=self.max_new_tokens,
                    metrics=METRICS,
                    fast=False,
                )
            )
        ok = [row for row in rows if not row["error"]]
        for row in rows:
            if row["error"]:
                LOG.warning(f"minicpmv_eval_generate: {row['error']}")
        if not ok:  # a score of nothing would read as 0 in the loggers' curves
            LOG.warning(f"minicpmv_eval_generate: none of the {len(rows)} eval samples could be answered; no scores logged")
            return
        values = {f"eval_{name}": round(sum(row[name] for row in ok) / len(ok), 4) for name in METRICS}
        logs.update(values)
        LOG.info(
            f"minicpmv_eval_generate: {len(ok)} of {len(rows)} eval samples answered at step {state.global_step}, "
            + ", ".join(f"{k} {v}" for k, v in values.items())
            + f"; {ok[0]['id']!r}: {ok[0]['prediction'][:80]!r}"
        )
        # Trainer.log appended a copy of `logs` to the history before the callbacks ran: keep the history complete
        if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
            state.log_history[-1].update(values)


def add_eval_generate(cfg, trainer) -> EvalGenerateCallback | None:
    """Build the callback for the first `minicpmv_eval_generate` eval samples and put it first among the trainer's callbacks."""
    count = MiniCPMVArgs.from_cfg(cfg).minicpmv_eval_generate
    if not count:
        return None
    if trainer.eval_dataset is None or "id" not in trainer.eval_dataset.column_names:
        LOG.warning("minicpmv_eval_generate: no eval dataset (set test_datasets or val_set_size); nothing is generated")
        return None
    first = trainer.eval_dataset.select(range(min(count, len(trainer.eval_dataset))))
    wanted = [str(i) for i in first["id"]]
    rows = _prepared_rows(cfg)
    missing = [i for i in wanted if i not in rows]
    if missing:
        raise ValueError(f"minicpmv_eval_generate: eval samples {missing[:5]} are not in the prepared dataset files of this config")
    requests = list(requests_from_samples([rows[i] for i in wanted], turns="last"))
    tokenizer = trainer.processing_class
    processor = MiniCPMVProcessor.from_config(tokenizer, trainer.model.config, max_slice_nums=cfg_value(cfg, "minicpmv_max_slice_nums"))
    longest = max((len(tokenizer.encode(ref)) for r in requests for ref in r.references), default=32)
    callback = EvalGenerateCallback(
        requests,
        processor,
        max_new_tokens=min(256, longest + 16),
        batch_size=cfg_value(cfg, "eval_batch_size") or cfg_value(cfg, "micro_batch_size") or 1,
        autocast=trainer.accelerator.autocast,
    )
    trainer.callback_handler.callbacks.insert(0, callback)
    LOG.info(f"minicpmv_eval_generate: greedy answers for {len(requests)} eval samples at each evaluation (eval_exact, eval_rouge_l)")
    return callback


def _prepared_rows(cfg) -> dict[str, dict]:
    """id -> prepared sample (absolute image paths or embedded pictures' bytes, tagged conversations), test datasets first."""
    rows: dict[str, dict] = {}
    for key in ("test_datasets", "datasets"):
        for ds_cfg in cfg_value(cfg, key, None) or []:
            path = cfg_value(ds_cfg, "path")
            if path and str(path).endswith(".parquet"):
                for row in pq.read_table(path).to_pylist():
                    rows.setdefault(str(row["id"]), {"id": row["id"], "image": row_images(row), "conversations": row["conversations"]})
    return rows
