"""Where the GPU waits during a whole `predict()` run (real size, random bf16 weights, bench_predict.py's samples).

`profile_predict_batch.py` times each stage of a batch alone; this one looks at a run as `bench_predict.py` times it,
with the prefetch threads working ahead, to find the time the GPU sits idle between and inside batches. After one
warm-up batch it traces --batches batches in the middle of a run with torch.profiler (CPU and CUDA), and reports:
the GPU's busy and idle time over the traced window, and the idle time split by what the model's thread was doing
then (predict's steps, labelled for the trace: the batch's answers, moving inputs, vision + embedding, FastDecoder's
prefill, the decoding loop, decoding the text, scoring; all of them run on the model's thread), with the longest
gaps, and the GPU's kernel time split by the step that launched each kernel (where the busy time goes: the model's
thread only waits for the GPU in some steps, so its time per step says little). The profiler slows launches and
traces each kernel inside a CUDA graph, so absolute times are upper bounds; the splits are what this script is for.

    python benchmarks/profiling/profile_predict_run.py [--batch-size 16] [--skip 3] [--batches 4]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench_chat, bench_predict

from bench_chat import bench_model  # noqa: E402
from bench_predict import make_samples  # noqa: E402

import axolotl_minicpmv.inference.generate as generate_module  # noqa: E402
import axolotl_minicpmv.integration.predict as predict_module  # noqa: E402

# Innermost first: idle time inside nested steps goes to the innermost one.
STEPS = ("prefill", "FastDecoder.generate", "embed_inputs", "move_inputs", "decode_answer", "score", "generate_answers", "_run_batch")
OUTSIDE = "outside predict's steps (between batches: waiting for inputs, the loop, writing rows)"


def label(owner, name: str, step: str) -> None:
    """Wrap `owner.name` so that its calls show in the trace as `step`."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(step):
            return fn(*args, **kwargs)

    setattr(owner, name, labelled)


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two sorted lists of disjoint intervals."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of `a` outside `b` (both sorted, disjoint)."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def total(intervals) -> float:
    return sum(end - start for start, end in intervals)


def inside(intervals: list[tuple[float, float]], t: float) -> bool:
    """Whether `t` falls in one of the sorted, disjoint `intervals`."""
    i = bisect.bisect_right(intervals, (t, math.inf)) - 1
    return i >= 0 and intervals[i][0] <= t <= intervals[i][1]


def kernel_ms_by_launching_step(events, steps: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """GPU kernel time split by the step whose thread launched each kernel (innermost step first), found through
    the kernel's link to the CPU operation that launched it. Kernels run later than they are launched, so the split
    by time above cannot say which step's work keeps the GPU busy; this one can."""
    # frontend operations only: a runtime event's own id (CUPTI's correlation) may equal an operation's id
    launched_at = {
        e.id: e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.linked_correlation_id
    }
    split = dict.fromkeys([*steps, OUTSIDE, "not linked to a launch"], 0.0)
    for kernel in events:
        if kernel.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start = launched_at.get(kernel.linked_correlation_id)
        name = "not linked to a launch" if start is None else next((n for n, spans in steps.items() if inside(spans, start)), OUTSIDE)
        split[name] += kernel.time_range.end - kernel.time_range.start
    return {name: round(us / 1e3, 1) for name, us in split.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip", type=int, default=3, help="batches run before the trace starts")
    parser.add_argument("--batches", type=int, default=4, help="batches traced")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, _, processor = bench_model()
    samples = make_samples(Path(tempfile.mkdtemp()), 200)
    settings = {"batch_size": args.batch_size, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "metrics": ["exact"]}
    list(predict_module.predict(model, processor, samples[: args.batch_size], **settings))  # warm-up: compilation

    label(predict_module, "_run_batch", "_run_batch")
    label(predict_module, "score", "score")
    label(predict_module, "generate_answers", "generate_answers")
    label(generate_module, "move_inputs", "move_inputs")
    label(generate_module, "decode_answer", "decode_answer")
    label(model, "embed_inputs", "embed_inputs")
    decoder = model._fast_decoder
    label(decoder, "_prefill", "prefill")
    label(decoder, "generate", "FastDecoder.generate")  # the prefill inside it is its own step

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    first, last = args.skip * args.batch_size, (args.skip + args.batches) * args.batch_size
    for done, _ in enumerate(predict_module.predict(model, processor, samples, **settings)):
        if done == first:
            torch.cuda.synchronize()
            profiler.start()
        if done == last:
            torch.cuda.synchronize()
            profiler.stop()
    events = profiler.events()

    kernels = merged([(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA])
    steps = {name: merged([(e.time_range.start, e.time_range.end) for e in events if e.name == name]) for name in STEPS}
    window = [(min(s[0][0] for s in steps.values() if s), kernels[-1][1])]
    idle = subtract(window, kernels)
    split, left = {}, idle
    for name in STEPS:
        split[name] = round(total(intersect(left, steps[name])) / 1e3, 1)
        left = subtract(left, steps[name])
    split[OUTSIDE] = round(total(left) / 1e3, 1)

    def where(gap) -> str:
        return next((name for name in STEPS if intersect([gap], steps[name])), OUTSIDE)

    longest = sorted(idle, key=lambda gap: gap[0] - gap[1])[:12]
    print(
        json.dumps(
            {
                "batches_traced": args.batches,
                "window_ms": round(total(window) / 1e3, 1),
                "gpu_busy_ms": round(total(intersect(kernels, window)) / 1e3, 1),
                "gpu_idle_ms": round(total(idle) / 1e3, 1),
                "idle_ms_by_step": split,
                "model_thread_ms_by_step": {name: round(total(steps[name]) / 1e3, 1) for name in STEPS},
                "kernel_ms_by_launching_step": kernel_ms_by_launching_step(events, steps),
                "longest_gaps": [
                    {"at_ms": round((start - window[0][0]) / 1e3, 1), "ms": round((end - start) / 1e3, 2), "during": where((start, end))}
                    for start, end in longest
                ],
            },
            indent=1,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
