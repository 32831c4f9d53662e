"""Test-time training: leave-one-out tasks from demo pairs only, one adapter per task from one engine reset in
place, resume at the first unfinished task, tasks spread over ranks."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from arc25_fast.cli import main
from arc25_fast.data.options import Augmentation
from arc25_fast.data.sources import LeaveOneOutSource
from arc25_fast.data.tasks import Task
from arc25_fast.runtime.rng import Rng

ROOT = Path(__file__).resolve().parents[1]


def grid(rng, h, w, colors=(0, 1, 2, 3)):
    return rng.choice(colors, size=(h, w)).tolist()


def write_tasks(path: Path, ids: list[str], seed: int = 0) -> Path:
    """Small ARC tasks with 3, 2 and 1 demo pairs, and a solutions sibling that is not valid ARC data (so any read
    of it would fail loudly)."""
    rng = np.random.default_rng(seed)
    tasks = {}
    for n, task_id in zip((3, 2, 1, 2), ids):
        pairs = [{"input": grid(rng, 4, 5), "output": grid(rng, 5, 4)} for _ in range(n)]
        tasks[task_id] = {"train": pairs, "test": [{"input": grid(rng, 4, 4)}]}
    path.write_text(json.dumps(tasks))
    path.with_name(path.name.replace("_challenges", "_solutions")).write_text(
        json.dumps({t: [[[12, 99]]] for t in ids}))
    return path


def ttt_args(tasks: Path, out: Path, *extra: str) -> list[str]:
    return ["ttt", "--tasks", f"kaggle:{tasks}", "--output-dir", str(out), "--max-steps", "3", "--max-tokens", "1024",
            "--lr", "1e-3", "--verify-samples", "20", "--threads", "1", *extra]


def test_leave_one_out_samples_come_from_demo_pairs_only():
    demo = [(np.full((2, 2), i, dtype=np.uint8), np.full((2, 3), i + 1, dtype=np.uint8)) for i in (1, 3, 5)]
    secret = (np.full((2, 2), 7, dtype=np.uint8), np.full((3, 3), 9, dtype=np.uint8))
    aug = Augmentation(dihedral=True, colors=False)
    source = LeaveOneOutSource("ttt", [Task("t", demo, [secret]), Task("one", demo[:1], [secret])], aug)
    rng = Rng.for_block(0, 0, 0, 0)
    seen_tests = set()
    for _ in range(200):
        sample = source.sample(rng)
        grids = [g for g in (*sample.user, *sample.answer) if isinstance(g, np.ndarray)]
        assert all(9 not in g and 7 not in g for g in grids)  # the test pair never appears
        if sample.task_id == "one":
            assert len(sample.demo_outputs) == 0  # a single demo pair: itself, with no examples
        else:
            assert len(sample.demo_outputs) == 2
            seen_tests.add(int(sample.answer[0].max()))
    assert seen_tests == {2, 4, 6}  # every demo pair takes its turn as the test pair


@pytest.fixture(scope="module")
def ttt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ttt")
    tasks = write_tasks(root / "x_challenges.json", ["aaa", "bbb", "ccc"])
    result = CliRunner().invoke(main, ttt_args(tasks, root / "out"))
    assert result.exit_code == 0, result.output
    return root, tasks


def test_one_adapter_per_task_that_loads_and_a_summary(ttt_run):
    root, _ = ttt_run
    out = root / "out"
    summary = json.loads((out / "ttt_summary.json").read_text())
    assert summary["tasks_done"] == 3 and summary["tasks_per_hour_per_process"] > 0
    assert json.loads((out / "config.json").read_text())["config"]["tasks"]["source"].startswith("kaggle:")
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    ids = torch.randint(0, 400, (1, 30))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    outputs = []
    for task_id in ("aaa", "bbb", "ccc"):
        info = summary["tasks"][task_id]
        assert info["status"] == "done" and info["steps"] == 3 and len(info["losses"]) == 3 and info["seconds"] > 0
        assert info["demo_pairs"] == {"aaa": 3, "bbb": 2, "ccc": 1}[task_id]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base_model")),
                                          str(out / task_id / "adapter"))
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
        assert not torch.allclose(outputs[-1], plain, atol=1e-4)  # each adapter was trained
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)  # on its own task


def test_the_engine_is_reset_between_tasks(ttt_run, tmp_path):
    """Task bbb trained after aaa (same engine, reset in place) equals bbb trained first in a fresh process."""
    root, _ = ttt_run
    alone = write_tasks(tmp_path / "y_challenges.json", ["aaa", "bbb", "ccc"])
    data = json.loads(alone.read_text())
    alone.write_text(json.dumps({"bbb": data["bbb"]}))
    result = CliRunner().invoke(main, ttt_args(alone, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    fresh = json.loads((tmp_path / "out" / "bbb" / "task.json").read_text())["losses"]
    after = json.loads((root / "out" / "bbb" / "task.json").read_text())["losses"]
    assert fresh == pytest.approx(after, rel=1e-6)


def test_bad_ttt_input_is_one_line(tmp_path, ttt_run, busy_core):
    root, tasks = ttt_run
    no_demos = tmp_path / "z_challenges.json"
    no_demos.write_text(json.dumps({"t1": {"train": [], "test": [{"input": [[1]]}]}}))
    cases = [(ttt_args(no_demos, tmp_path / "a"), "t1: task has no train pairs"),
             (["ttt", "--tasks", "her:x.jsonl", "--output-dir", str(tmp_path / "b")], "use an ARC task source"),
             (["ttt", "--tasks", "synthetic", "--output-dir", str(tmp_path / "b")], "use synthetic:COUNT[:SEED]"),
             (ttt_args(tasks, tmp_path / "c", "--adapter", str(tmp_path)), "no adapter_config.json"),
             (ttt_args(tasks, root / "out"), "holds another run")]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], (args, lines)


@pytest.mark.slow
def test_a_killed_ttt_run_resumes_at_the_first_unfinished_task(ttt_run, tmp_path):
    root, tasks = ttt_run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "arc25_fast.cli", *ttt_args(tasks, out, "--max-steps", "40")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "aaa" / "task.json").exists():
        assert proc.poll() is None
        time.sleep(0.02)
    proc.kill()  # kill -9 while the second task trains
    proc.wait()
    first = (out / "aaa" / "task.json").read_text()
    assert {p.parent.name for p in out.glob("*/task.json")} == {"aaa"}
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "aaa" / "task.json").read_text() == first  # the finished task is not redone
    summary = json.loads((out / "ttt_summary.json").read_text())
    assert summary["tasks_done"] == 3 and all(t["steps"] == 40 for t in summary["tasks"].values())
    assert not (out / "bbb" / "adapter.tmp").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_tasks_are_spread_over_ranks_under_the_launcher(ttt_run, tmp_path):
    root, tasks = ttt_run
    out = tmp_path / "out"
    cmd = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(29100 + os.getpid() % 300),
           str(ROOT / "train_ds.py"), *ttt_args(tasks, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "ttt_summary.json").read_text())
    assert sorted(summary["tasks"]) == ["aaa", "bbb", "ccc"] and summary["tasks_done"] == 3
    reference = json.loads((root / "out" / "ttt_summary.json").read_text())["tasks"]
    for task_id, info in summary["tasks"].items():  # a task trains the same on whichever rank takes it
        assert info["losses"] == pytest.approx(reference[task_id]["losses"], rel=1e-6)
