"""benchmarks/results_table.py: the every-run table of RESULTS.md is rendered from results.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import results_table  # noqa: E402

CHAT = {
    "bench": "chat",
    "gpu": "GPU-X",
    "date": "2026-01-02",
    "fast": True,
    "versions": {"torch": "9.9", "transformers": "8.8"},
    "command": "python benchmarks/bench_chat.py --fast",
    "ttft_ms_448x448": 41.5,
    "ttft_ms_1344x896": 77.0,
    "decode_tokens_per_s_batch1": 301.2,
    "total_tokens_per_s_batch8": 1800.0,
    "peak_mem_gib_batch1": 6.5,
    "peak_mem_gib_batch8": 9.0,
    "fast_vs_plain_first_diff": None,
}
TRAIN = {
    "bench": "train",
    "deepspeed": "zero2",
    "rc": 0,
    "steps_logged": 20,
    "samples_per_second_median": 3.3,
    "peak_mem_allocated_gib": 30.1,
    "device_reserved_gib": 33.0,
    "gpu": "GPU-X",
    "date": "2026-01-03",
    "command": "python benchmarks/bench_train.py --deepspeed configs/deepspeed/zero2.json",
}


def write_pair(tmp_path, runs):
    jsonl, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in runs))
    md.write_text(f"# Results\nprose above\n\n{results_table.BEGIN}\nstale row\n{results_table.END}\n\nprose below\n")
    return jsonl, md


def test_update_writes_one_row_per_run_between_the_markers(tmp_path):
    failed = dict(TRAIN, rc=1, steps_logged=0, date="2026-01-04")
    with_overall = dict(TRAIN, samples_per_second_median=3.0860000000000003, samples_per_second_overall=2.9, date="2026-01-05")
    two_gpus = dict(TRAIN, processes=2, samples_per_second_median=6.5, date="2026-01-06")
    jsonl, md = write_pair(tmp_path, [CHAT, TRAIN, failed, with_overall, two_gpus])
    results_table.update(jsonl, md)
    text = md.read_text()
    assert text.startswith("# Results\nprose above\n\n") and text.endswith("\n\nprose below\n")
    assert "stale row" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 2026-")]
    assert len(rows) == 5
    assert "torch 9.9, transformers 8.8" in rows[0] and "`python benchmarks/bench_chat.py --fast`" in rows[0]
    assert "decode b1 301.2 tok/s" in rows[0] and "TTFT 1344x896 77.0 ms" in rows[0] and "fast = plain greedy tokens" in rows[0]
    assert "train zero2: 3.3 samples/s (median step); peak 30.1 GiB allocated (33.0 reserved)" in rows[1] and "not recorded" in rows[1]
    assert "failed (exit 1) after 0 steps" in rows[2]
    assert "3.086 samples/s (median step), 2.9 overall; peak" in rows[3]  # float noise rounded away
    assert "6.5 samples/s (median step) on 2 GPUs; peak 30.1 GiB allocated (33.0 reserved) on rank 0's GPU" in rows[4]
    results_table.update(jsonl, md)  # rendering again changes nothing
    assert md.read_text() == text


def test_a_file_without_markers_is_refused(tmp_path):
    jsonl, md = write_pair(tmp_path, [CHAT])
    md.write_text("# Results\n")
    with pytest.raises(ValueError, match="no every-run table markers"):
        results_table.update(jsonl, md)


def test_record_elsewhere_appends_and_leaves_results_md_alone(tmp_path):
    before = results_table.RESULTS_MD.read_text()
    out = tmp_path / "out.jsonl"
    results_table.record(CHAT, out)
    results_table.record(TRAIN, out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [CHAT, TRAIN]
    assert results_table.RESULTS_MD.read_text() == before


def test_the_committed_table_is_rendered_from_the_committed_results(tmp_path):
    assert results_table.RESULTS_JSONL.read_text().strip()
    rendered = tmp_path / "RESULTS.md"
    rendered.write_text(results_table.RESULTS_MD.read_text())
    results_table.update(results_table.RESULTS_JSONL, rendered)
    assert rendered.read_text() == results_table.RESULTS_MD.read_text()


def test_a_run_with_fewer_measurements_shows_those_it_has(tmp_path):
    skipped = ("ttft_ms_448x448", "decode", "total", "peak", "fast_vs")
    ttft_only = {k: v for k, v in CHAT.items() if not k.startswith(skipped)} | {"first_call_s_1344x896": 107.7, "note": "vision eager"}
    jsonl, md = write_pair(tmp_path, [ttft_only])
    results_table.update(jsonl, md)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 2026-"))
    assert row.endswith("| chat fast: TTFT 1344x896 77.0 ms; first 1344x896 call 107.7 s; vision eager |"), row


def test_a_run_without_steady_steps_and_a_run_without_deepspeed_are_named_as_such(tmp_path):
    short = dict(TRAIN, config="minicpmv_lora_fast", deepspeed="none", samples_per_second_median=None, steps_logged=3)
    jsonl, md = write_pair(tmp_path, [short])
    results_table.update(jsonl, md)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 2026-"))
    assert row.endswith("train minicpmv_lora_fast none: no steady-state step (3 steps logged) |"), row
