"""arc25-fast evaluate end to end on CPU with Hugging Face generate: a tiny model trained until it solves its tasks
is scored as solving them, through both prompt kinds; predictions, a Kaggle submission and HER lines that train."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import invoke

from arc25_fast.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flip(tmp_path_factory):
    """Three ARC tasks whose rule is 'flip upside down', and the HER lines of the program that does it."""
    root = tmp_path_factory.mktemp("flip")
    rng = np.random.default_rng(0)
    code = "def task(img):\n    return img[::-1]"
    tasks, her = {}, []
    for t in range(3):
        grids = [rng.integers(0, 10, size=(3, 4)) for _ in range(3)]
        pairs = [{"input": g.tolist(), "output": g[::-1].tolist()} for g in grids]
        her.append({"inputs": [p["input"] for p in pairs], "outputs": [p["output"] for p in pairs], "code": code})
        test = rng.integers(0, 10, size=(4, 3))
        tasks[f"flip{t}"] = {"train": pairs, "test": [{"input": test.tolist(), "output": test[::-1].tolist()}]}
    (root / "her.jsonl").write_text("".join(json.dumps(h) + "\n" for h in her))
    (root / "flip_challenges.json").write_text(json.dumps(tasks))
    return root


@pytest.fixture(scope="module")
def code_model(flip):
    """Full fine-tuning on the HER lines until the model writes the program; scored by generation while training."""
    out = flip / "code_run"
    invoke(["train", "--task-source", f"her:{flip / 'her.jsonl'}", "--no-lora", "--lr", "3e-3", "--max-steps", "80",
            "--warmup-steps", "5", "--max-tokens", "1024", "--eval-every", "0", "--verify-samples", "0",
            "--num-workers", "0", "--save-every", "0", "--output-dir", str(out),
            "--eval-tasks", f"kaggle:{flip / 'flip_challenges.json'}", "--eval-tasks-every", "80",
            "--eval-samples", "2", "--eval-max-new-tokens", "40"])
    return out


def test_generation_scores_are_logged_during_training(code_model):
    rows = [json.loads(x) for x in (code_model / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 80 and last["eval_tasks"] == 3 and last["eval_programs"] == 6
    assert last["eval_pass@1"] == 1.0 and last["eval_train_correct"] == 6


def test_evaluate_code_prompts_solve_write_a_submission_and_her_lines_that_train(flip, code_model):
    out, her = flip / "eval_code", flip / "her_out.jsonl"
    invoke(["evaluate", "--tasks", f"kaggle:{flip / 'flip_challenges.json'}", "--model", str(code_model / "model"),
            "--prompt-kind", "code", "--samples", "3", "--max-new-tokens", "40", "--temperature", "0.5",
            "--workers", "2", "--output-dir", str(out), "--her-out", str(her)])
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["tasks_scored"] == 3 and summary["pass@1"] == 1.0 and summary["pass@2"] == 1.0
    assert summary["programs"] == 9 and summary["train_correct_rate"] == 1.0 and summary["exec_errors"] == 0
    assert summary["generation_tokens_per_s"] > 0 and summary["programs_per_s"] > 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["task_id"] for r in rows) == ["flip0", "flip1", "flip2"]
    assert all(len(r["samples_detail"]) == 3 and r["samples_detail"][0]["demos_solved"] == 3 for r in rows)
    submission = json.loads((out / "submission.json").read_text())
    tasks = json.loads((flip / "flip_challenges.json").read_text())
    for task_id, task in tasks.items():  # Kaggle's format: per test input, two attempts
        assert submission[task_id] == [{"attempt_1": task["test"][0]["output"], "attempt_2": [[0]]}]
    lines = [json.loads(x) for x in her.read_text().splitlines()]
    assert len(lines) == 9 and all(len(x["inputs"]) == len(x["outputs"]) == 4 for x in lines)
    assert lines[0]["outputs"][-1] == tasks[lines[0]["task_id"]]["test"][0]["output"]  # what the program produced
    invoke(["train", "--task-source", f"her:{her}", "--max-steps", "1", "--max-tokens", "1024", "--eval-every", "0",
            "--verify-samples", "20", "--num-workers", "0", "--output-dir", str(flip / "her_round_trip")])


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    """Three ARC tasks whose output is always the same small grid (the same for all three)."""
    root = tmp_path_factory.mktemp("constant")
    rng = np.random.default_rng(1)
    tasks = {}
    answer = [[1, 2], [3, 4]]
    for t in range(3):
        pairs = [{"input": rng.integers(0, 10, size=(3, 3)).tolist(), "output": answer} for _ in range(3)]
        tasks[f"const{t}"] = {"train": pairs, "test": [{"input": rng.integers(0, 10, size=(3, 3)).tolist(),
                                                        "output": answer}]}
    (root / "const_challenges.json").write_text(json.dumps(tasks))
    return root


@pytest.fixture(scope="module")
def output_model(constant):
    """Trained without augmentation: it learns to write that grid whatever the prompt."""
    out = constant / "output_run"
    invoke(["train", "--task-source", f"kaggle:{constant / 'const_challenges.json'}", "--no-lora", "--lr", "3e-3",
            "--max-steps", "60", "--warmup-steps", "5", "--max-tokens", "1024", "--eval-every", "0",
            "--verify-samples", "0", "--num-workers", "0", "--save-every", "0", "--no-dihedral",
            "--no-color-permutation", "--output-dir", str(out)])
    return out


def test_evaluate_output_prompts_with_voting(constant, output_model):
    out = constant / "eval_output"
    invoke(["evaluate", "--tasks", f"kaggle:{constant / 'const_challenges.json'}", "--model", str(output_model / "model"),
            "--prompt-kind", "output", "--samples", "2", "--max-new-tokens", "40", "--temperature", "0.3",
            "--vote", "--vote-augmentations", "3", "--output-dir", str(out)])
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["tasks_scored"] == 3 and summary["samples"] == 3 * 3 * 2 and summary["programs"] == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {d["dihedral"] for r in rows for d in r["samples_detail"]} != {0}  # augmented prompts were asked
    # the model writes its grid under every augmentation, so mapped back those answers are other grids: each
    # group has as many votes as the plain one, and the tie goes to the plain prompt's answer, asked first
    assert summary["pass@1"] == 1.0 and all(len(r["attempts"][0]) == 2 for r in rows)


def test_evaluate_uses_each_tasks_ttt_adapter(constant, output_model):
    tasks = f"kaggle:{constant / 'const_challenges.json'}"
    invoke(["ttt", "--tasks", tasks, "--model", str(output_model / "model"), "--max-steps", "2", "--max-tokens", "1024",
            "--verify-samples", "0", "--output-dir", str(constant / "ttt")])
    out = constant / "eval_ttt"
    invoke(["evaluate", "--tasks", tasks, "--ttt-dir", str(constant / "ttt"), "--samples", "2", "--max-new-tokens", "40",
            "--temperature", "0.3", "--output-dir", str(out)])
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["task_id"]: r["adapter"] for r in rows} == {t: str(constant / "ttt" / t / "adapter")
                                                          for t in ("const0", "const1", "const2")}
    assert json.loads((out / "evaluate_summary.json").read_text())["pass@2"] == 1.0


def test_bad_evaluate_input_is_one_line(flip, tmp_path, busy_core):
    tasks = f"kaggle:{flip / 'flip_challenges.json'}"
    cases = [(["--adapter", str(tmp_path), "--ttt-dir", str(tmp_path)], "--adapter and --ttt-dir both"),
             (["--model", "tiny"], "evaluation needs trained weights"),
             (["--model", "/nonexistent", "--prompt-kind", "code", "--vote"], "--vote applies to --prompt-kind output"),
             (["--ttt-dir", str(tmp_path)], "no config.json"),
             (["--model", "/nonexistent", "--prompt-kind", "code", "--samples", "4", "--rest-samples", "4"],
              "--rest-samples 4 must be less than --samples 4"),
             (["--model", "/nonexistent", "--rest-samples", "2"], "--rest-samples applies to --prompt-kind code"),
             (["--model", "/nonexistent", "--prompt-kind", "code", "--rest-samples", "2", "--rest-steps", "3"],
              "--rest-steps 3 is more than --rest-samples 2"),
             (["--model", "/nonexistent", "--prompt-kind", "code", "--split-colors"],
              "--split-colors writes the first programs for one colour each")]
    if not torch.cuda.is_available():
        cases.append((["--model", "/nonexistent", "--decode", "graph"], "--decode graph replays CUDA graphs"))
    for extra, message in cases:
        result = CliRunner().invoke(main, ["evaluate", "--tasks", tasks, "--output-dir", str(tmp_path / "o"), *extra])
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], (extra, lines)


def test_evaluate_output_prompts_with_dfs_and_augmentation_scores(constant, output_model):
    out = constant / "eval_dfs"
    invoke(["evaluate", "--tasks", f"kaggle:{constant / 'const_challenges.json'}", "--model", str(output_model / "model"),
            "--prompt-kind", "output", "--sampler", "dfs", "--min-prob", "0.05", "--max-new-tokens", "40",
            "--score-augmentations", "3", "--output-dir", str(out)])
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert summary["sampler"].startswith("dfs (min prob 0.05") and "under 3 views" in summary["ranking"]
    assert summary["pass@1"] == 1.0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["rescored"] >= 3 and r["samples_detail"] for r in rows)
    logprobs = [d["logprob"] for d in rows[0]["samples_detail"]]
    assert logprobs == sorted(logprobs, reverse=True) and all(lp >= math.log(0.05) - 1e-6 for lp in logprobs)
    default = json.loads((constant / "eval_output" / "evaluate_summary.json").read_text())
    assert default["sampler"] == "shared-prefix sampling" and default["ranking"] == "votes, first sample"
