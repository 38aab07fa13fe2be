"""benchmarks/bench_train.py's own behaviour on the CPU: what it runs and records must be right before a GPU's
scarce minutes go into it (the training runs themselves need a GPU: benchmarks/RESULTS.md)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bench_train import make_dataset, parse_args  # noqa: E402


def test_bench_train_makes_the_same_dataset_on_every_run(tmp_path):
    """The pictures are drawn once per work folder; the conversations must not move with whether they exist."""
    first = make_dataset(tmp_path, 3).read_text()
    assert make_dataset(tmp_path, 3).read_text() == first


def test_bench_train_keeps_every_set_override_and_refuses_a_run_without_steady_steps(capsys):
    args = parse_args(["--set", "micro_batch_size=3", "--set", "optimizer=adamw_torch_fused", "gradient_accumulation_steps=2"])
    assert args.set == ["micro_batch_size=3", "optimizer=adamw_torch_fused", "gradient_accumulation_steps=2"]
    with pytest.raises(SystemExit):
        parse_args(["--steps", "5", "--warmup-steps", "5"])
    assert "leaves no steady-state step" in capsys.readouterr().err


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "a-second-signal-during-cleanup"])
def test_a_run_stopped_by_timeout_stops_its_trainer_and_returns(tmp_path, signals):
    """`timeout` (as the device calls use) signals bench_train only: the trainer it started, and that trainer's
    own children, must stop with it instead of holding the GPU through the next run, also when the trainer
    ignores SIGTERM and a second signal comes while bench_train is stopping it."""
    pid_file = tmp_path / "grandchild.pid"
    trainer = (
        "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"p = subprocess.Popen(['sleep', '120']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    script = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); from bench_train import run_training; "
        f"sys.exit(-run_training([sys.executable, '-c', {trainer!r}], sys.stdout, grace_s=3))"
    )
    bench = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.2)
    grandchild = int(pid_file.read_text())
    for _ in range(signals):
        bench.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    assert bench.wait(timeout=30) == signal.SIGTERM
    assert _ends(grandchild, within=10)


def _ends(pid: int, within: float) -> bool:
    """Whether process `pid` is gone or a zombie (dead, not yet reaped by an init that may never reap) in time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.2)
    return False
