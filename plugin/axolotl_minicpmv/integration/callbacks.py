"""Training-time logs: throughput over each logging window (samples/s, data loading included, evaluation excluded)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `minicpmv/samples_per_second` (all ranks together) to every training log line: the samples of the steps
    since the previous training log over the wall time since then, so fetching and collating batches (decoding and
    slicing pictures) count, and evaluations in between do not. The last step of an epoch may hold fewer samples
    than a full step; it is counted as full."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._window_start: float | None = None
        self._steps = 0
        self._last_step_end: float | None = None
        self._evaluating = 0.0  # seconds of evaluation inside the window

    def on_train_begin(self, args, state, control, **kwargs):
        self._window_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        self._last_step_end = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        # an evaluation runs right after a step ends (and after that step's training log, when it has one)
        if self._window_start is not None and self._last_step_end is not None:
            self._evaluating += time.perf_counter() - max(self._last_step_end, self._window_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._window_start is None or not self._steps:
            return
        now = time.perf_counter()
        logs["minicpmv/samples_per_second"] = round(self._steps * self.samples_per_step / (now - self._window_start - self._evaluating), 3)
        self._window_start, self._steps, self._evaluating = now, 0, 0.0
