"""The "Every run" table of benchmarks/RESULTS.md, rendered from benchmarks/results.jsonl.

bench_chat.py and bench_train.py append one JSON line per run and re-render the table, so every number
in it comes from a line written by the command shown beside it. Lines measured on another machine
(`--out` elsewhere) are appended to results.jsonl by hand; then `python benchmarks/results_table.py`
renders the table again.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_JSONL = HERE / "results.jsonl"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN = "<!-- every-run table: rendered by benchmarks/results_table.py from results.jsonl -->"
END = "<!-- end of every-run table -->"


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` (those not installed are left out)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


CHAT_FIELDS = [  # (key, label) in the order shown; runs may lack some (e.g. --ttft-only)
    ("decoder", "{}"),
    ("ttft_ms_448x448", "TTFT 448x448 {} ms"),
    ("ttft_ms_1344x896", "TTFT 1344x896 {} ms"),
    ("first_call_s_1344x896", "first 1344x896 call {} s"),
    ("decode_tokens_per_s_batch1", "decode b1 {} tok/s"),
    ("decode_first_call_s_batch1", "first decode call b1 {} s"),
    ("total_tokens_per_s_batch8", "b8 total {} tok/s"),
    ("peak_mem_gib_batch1", "peak memory b1 {} GiB"),
    ("peak_mem_gib_batch8", "b8 {} GiB"),
    ("beam3_tokens_per_s", "beam search (3 beams) {} tok/s"),
]


def _summary(run: dict) -> str:
    if run["bench"] == "predict":
        return (
            f"{run['generated_tokens_per_s']} generated tokens/s, {run['samples_per_s']} samples/s at batch {run['batch_size']} "
            f"({run['samples']} samples, {run['new_tokens']} new tokens each); peak {run['peak_mem_gib']} GiB"
        )
    if run["bench"] == "chat":
        parts = [label.format(run[key]) for key, label in CHAT_FIELDS if key in run]
        if "fast_vs_plain_first_diff" in run:
            diff = run["fast_vs_plain_first_diff"]
            parts.append("fast = plain greedy tokens" if diff is None else f"fast vs plain: first differing token {diff}")
        if "note" in run:
            parts.append(run["note"])
        return "; ".join(parts)
    if run["bench"] == "serve":
        parts = [
            f"{lv['clients']} clients: {lv['requests_per_s']} req/s, {lv['tokens_per_s']} tok/s, TTFT p50/p95 "
            f"{lv['ttft_ms_p50']}/{lv['ttft_ms_p95']} ms, latency p50/p95 {lv['latency_s_p50']}/{lv['latency_s_p95']} s"
            for lv in run["levels"]
        ]
        if "tokens_per_s_32_over_1" in run:
            parts.append(f"32 vs 1 client tokens/s x{run['tokens_per_s_32_over_1']}")
        if run.get("warm_up_s") is not None:
            parts.append(f"server warm-up {run['warm_up_s']} s")
        return "; ".join(parts)
    if run["rc"] != 0:
        return f"failed (exit {run['rc']}) after {run['steps_logged']} steps"
    if run["samples_per_second_median"] is None:
        return f"no steady-state step ({run['steps_logged']} steps logged)"
    rate = f"{round(float(run['samples_per_second_median']), 3)} samples/s (median step)"
    if "samples_per_second_overall" in run:  # recorded since 2026-11-27
        rate += f", {run['samples_per_second_overall']} overall"
    memory = f"peak {run['peak_mem_allocated_gib']} GiB allocated ({run['device_reserved_gib']} reserved)"
    if run.get("processes", 1) > 1:
        rate, memory = f"{rate} on {run['processes']} GPUs", f"{memory} on rank 0's GPU"
    return f"{rate}; {memory}; {run['steps_logged']} steps"


def _versions_cell(run: dict) -> str:
    if "versions" in run:
        return ", ".join(f"{name} {version}" for name, version in run["versions"].items())
    if "torch" in run:
        return f"torch {run['torch']}, transformers {run['transformers']}"
    return "not recorded"


def render(runs: list[dict]) -> str:
    rows = ["| date | GPU | versions | command | result |", "|---|---|---|---|---|"]
    for run in runs:
        what = run["bench"] + (" fast" if run.get("fast") else "") + "".join(f" {run[k]}" for k in ("config", "deepspeed") if k in run)
        rows.append(f"| {run['date']} | {run['gpu']} | {_versions_cell(run)} | `{run['command']}` | {what}: {_summary(run)} |")
    return "\n".join(rows)


def update(jsonl: Path = RESULTS_JSONL, markdown: Path = RESULTS_MD) -> None:
    """Replace the table between the markers of `markdown` with one row per line of `jsonl`."""
    runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    text = markdown.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{markdown} has no every-run table markers ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    markdown.write_text(f"{head}{BEGIN}\n{render(runs)}\n{END}{tail}")


def record(result: dict, out: Path) -> None:
    """Append `result` to `out`; when that is the repository's results.jsonl, re-render the table."""
    print(json.dumps(result))
    with open(out, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    if Path(out).resolve() == RESULTS_JSONL:
        update()


if __name__ == "__main__":
    update(*(Path(arg) for arg in sys.argv[1:3]))
