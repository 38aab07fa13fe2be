"""Training-time logs: throughput over each logging window (samples/s, data loading included, evaluation excluded)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `minicpmv/samples_per_second` (all ranks together) to every training log line: the samples of the steps
    since the previous training log over the wall time since then, so fetching and collating batches (decoding and
    slicing pictures) count, while evaluations (also the one before training, and each eval set of several) and
    checkpoint saves in between do not. The last step of an epoch may hold fewer samples than a full step; it is
    counted as full."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._window_start: float | None = None
        self._steps = 0
        self._mark: float | None = None  # when the last step, evaluation or save ended
        self._left_out = 0.0  # seconds of evaluation and saving inside the window

    def on_train_begin(self, args, state, control, **kwargs):
        self._window_start = self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        self._mark = time.perf_counter()

    def _leave_out(self) -> None:
        # evaluations and saves run right after a step ends (after its training log, when it has one), one after another
        if self._mark is not None:
            now = time.perf_counter()
            self._left_out += now - self._mark
            self._mark = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._leave_out()

    def on_save(self, args, state, control, **kwargs):
        self._leave_out()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._window_start is None or not self._steps:
            return
        now = time.perf_counter()
        logs["minicpmv/samples_per_second"] = round(self._steps * self.samples_per_step / (now - self._window_start - self._left_out), 3)
        self._window_start = self._mark = now
        self._steps, self._left_out = 0, 0.0
