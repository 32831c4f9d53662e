"""evaluate never answers silently wrong and never loses a run: each task's answers come from exactly its own
adapter (tied embedding/head adapters included), one task's failure costs that task, an interrupted run leaves a
valid submission and resumes, and hindsight lines are only those the her: source accepts."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import invoke
from transformers import AutoModelForCausalLM

from arc25_fast.commands.configs import TrainConfig
from arc25_fast.data.tokenizer import load_tokenizer
from arc25_fast.runtime.options import configure
from arc25_fast.solving.generation import HFGenerator
from arc25_fast.solving.solver import self_contained
from arc25_fast.training.model import add_adapter, load_base_model, sync_tied_head

pytestmark = pytest.mark.slow
TASK_IDS = ("task_a", "task_b", "task_c")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base model and two tied embedding/head adapters (``--lora-targets all``) with distinct random weights,
    kept in memory as trained too."""
    root = tmp_path_factory.mktemp("adapters")
    tok = load_tokenizer("tiny")
    load_base_model("tiny", len(tok), torch.float32, "sdpa", 0).save_pretrained(root / "base")
    trained = {}
    for i, name in enumerate(("a0", "a1")):
        model = add_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), configure(TrainConfig, model="tiny",
                                                                                          lora_targets="all"))
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora" in n:
                    p.normal_(0, 0.5)
        sync_tied_head(model)
        model.save_pretrained(root / name)
        trained[name] = model.eval()
    return root, tok, trained


def test_tied_head_adapters_switch_with_the_head_term_applied(models):
    root, tok, trained = models
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        want = {name: m(ids).logits for name, m in trained.items()}
        want[None] = AutoModelForCausalLM.from_pretrained(root / "base")(ids).logits
    generator = HFGenerator(AutoModelForCausalLM.from_pretrained(root / "base").eval(), tok, [0], torch.device("cpu"))
    loads = 0
    for name in ("a0", "a0", "a1", None, "a1", "a0", None):
        before = generator.adapter_path
        generator.use_adapter(str(root / name) if name else None)
        loads += name is not None and generator.adapter_path != before
        sync_tied_head(generator.model)
        with torch.no_grad():
            got = generator.model(ids).logits
        assert torch.allclose(got, want[name], atol=1e-4), name  # exactly that adapter, head term included
    assert loads == 4  # a0, a1, a1 again after the base, a0 again: never the same adapter twice in a row


@pytest.fixture(scope="module")
def ttt_run(models, tmp_path_factory):
    """Three tasks: task_a has adapter a0, task_b none, task_c adapter a1 (as ``ttt`` lays them out)."""
    root, _, _ = models
    run = tmp_path_factory.mktemp("ttt")
    (run / "config.json").write_text(json.dumps({"config": {"model": {"name": str(root / "base"), "adapter": None}}}))
    for task_id, name in (("task_a", "a0"), ("task_c", "a1")):
        shutil.copytree(root / name, run / task_id / "adapter")
    tasks = {t: {"train": [{"input": [[i, 1], [2, 3]], "output": [[3, 2], [1, i]]}],
                 "test": [{"input": [[i, 4], [5, 6]], "output": [[6, 5], [4, i]]}]} for i, t in enumerate(TASK_IDS)}
    (run / "x_challenges.json").write_text(json.dumps(tasks))
    return run


def answers(out) -> dict:
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return {r["task_id"]: (r["adapter"], r["adapter_sha256"], [d["text"] for d in r["samples_detail"]]) for r in rows}


def evaluate_args(run, out, *extra):
    return ["evaluate", "--tasks", f"kaggle:{run / 'x_challenges.json'}", "--samples", "1", "--temperature", "0",
            "--max-new-tokens", "12", "--verify-samples", "0", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def alone(models, ttt_run, tmp_path_factory):
    """Every task answered by the base model alone, and by each adapter alone."""
    root, _, _ = models
    out, answered = tmp_path_factory.mktemp("alone"), {}
    for name, extra in (("base", ["--model", str(root / "base")]), ("a0", ["--adapter", str(root / "a0")]),
                        ("a1", ["--adapter", str(root / "a1")])):
        invoke(evaluate_args(ttt_run, out / name, *extra))
        answered[name] = answers(out / name)
    return answered


def test_each_task_is_answered_by_its_own_adapter_or_the_base_model(ttt_run, alone, tmp_path):
    invoke(evaluate_args(ttt_run, tmp_path / "ttt", "--ttt-dir", str(ttt_run)))
    got = answers(tmp_path / "ttt")
    assert got["task_b"][0] is None and got["task_b"][1] is None
    assert got["task_a"][0].endswith("task_a/adapter") and got["task_c"][0].endswith("task_c/adapter")
    assert got["task_a"][1] != got["task_c"][1]
    assert got["task_a"][2] == alone["a0"]["task_a"][2] and got["task_a"][1] == alone["a0"]["task_a"][1]
    assert got["task_b"][2] == alone["base"]["task_b"][2]  # not the previous task's adapter
    assert got["task_c"][2] == alone["a1"]["task_c"][2]
    assert got["task_b"][2] != alone["a0"]["task_b"][2]  # the adapters do change the answers: the test can fail


def test_a_failing_task_costs_only_itself_and_the_submission_holds_every_task(ttt_run, alone, tmp_path):
    broken = tmp_path / "ttt"
    shutil.copytree(ttt_run, broken)
    (broken / "task_a" / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    invoke(evaluate_args(broken, out, "--ttt-dir", str(broken)))
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["tasks"] == 3 and summary["tasks_failed"] == 1 and summary["failed"] == ["task_a"]
    rows = {r["task_id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert "failed" in rows["task_a"] and "failed" not in rows["task_b"] and rows["task_c"]["samples"] == 1
    got = answers(out)  # the failed load left nothing behind: the next task is the base model's answer
    assert got["task_b"][2] == alone["base"]["task_b"][2] and got["task_c"][2] == alone["a1"]["task_c"][2]
    submission = json.loads((out / "submission.json").read_text())
    assert sorted(submission) == list(TASK_IDS)
    assert submission["task_a"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]  # the documented fallback


STALL = "```python\ndef task(img):\n    while True:\n        pass\n```"


def test_an_interrupted_run_leaves_a_valid_submission_and_resumes(ttt_run, tmp_path):
    replay = tmp_path / "answers.jsonl"
    replay.write_text("".join(json.dumps({"task_id": t, "samples_detail": [{"text": STALL}] * 2}) + "\n"
                              for t in TASK_IDS))
    out = tmp_path / "out"
    args = ["evaluate", "--tasks", f"kaggle:{ttt_run / 'x_challenges.json'}", "--replay", str(replay),
            "--prompt-kind", "code", "--call-seconds", "1", "--workers", "1", "--verify-samples", "0",
            "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", "from arc25_fast.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (predictions.exists() and predictions.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = predictions.read_text().splitlines()
    assert 1 <= len(first) < 3
    submission = json.loads((out / "submission.json").read_text())  # valid, and every task is there
    assert sorted(submission) == list(TASK_IDS)
    invoke(args[:-2] + ["--output-dir", str(out), "--resume"])
    rows = predictions.read_text().splitlines()
    assert rows[:len(first)] == first and len(rows) == 3  # the recorded tasks were not redone
    assert sorted(json.loads(r)["task_id"] for r in rows) == list(TASK_IDS)
    assert json.loads((out / "evaluate_summary.json").read_text())["tasks"] == 3


def test_her_lines_are_what_the_her_source_accepts(ttt_run, tmp_path):
    flip = "def task(img):\n    return np.flipud(img)"
    texts = [f"```python\n{flip}\n```", "```python\n# <|endoftext|>\ndef task(img):\n    return img\n```"]
    replay = tmp_path / "answers.jsonl"
    replay.write_text("".join(json.dumps({"task_id": t, "samples_detail": [{"text": x} for x in texts]}) + "\n"
                              for t in TASK_IDS))
    out, her = tmp_path / "out", tmp_path / "her.jsonl"
    invoke(["evaluate", "--tasks", f"kaggle:{ttt_run / 'x_challenges.json'}", "--replay", str(replay),
            "--prompt-kind", "code", "--workers", "1", "--verify-samples", "0", "--output-dir", str(out),
            "--her-out", str(her)])
    lines = [json.loads(x) for x in her.read_text().splitlines()]
    assert len(lines) == 3 and all(x["code"] == "import numpy as np\n" + flip for x in lines)
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["her_lines"] == 3 and sum(summary["her_left_out"].values()) == 3
    assert "special token" in next(iter(summary["her_left_out"]))
    invoke(["train", "--task-source", f"her:{her}", "--max-steps", "1", "--max-tokens", "1024", "--eval-every", "0",
            "--verify-samples", "3", "--num-workers", "0", "--output-dir", str(tmp_path / "train")])


def test_self_contained_adds_only_missing_imports():
    assert self_contained("def task(img):\n    return np.flipud(img)").startswith("import numpy as np\n")
    assert self_contained("import numpy as np\ndef task(img):\n    return np.flipud(img)").count("import") == 1
    assert self_contained("def task(img):\n    return img") == "def task(img):\n    return img"
