"""Training-time logs: throughput over each logging window (samples/s, excluding evaluation)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `minicpmv/samples_per_second` (all ranks together) to every training log line."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._window_start = None
        self._window_steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._window_steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._window_start is None or not self._window_steps:
            return
        elapsed = time.perf_counter() - self._window_start
        logs["minicpmv/samples_per_second"] = round(self._window_steps * self.samples_per_step / elapsed, 3)
        self._window_start, self._window_steps = None, 0
