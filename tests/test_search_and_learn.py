"""search-and-learn: hindsight selection, the shared task queue, and the loop machinery end to end (rounds, hindsight
relabelling, learning between rounds, resume after kill -9, two ranks on one queue). No learning threshold here: the
learning is measured by benchmarks/search_and_learn.py and reported in docs/SEARCH.md."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import invoke

from arc25_fast.cli import main
from arc25_fast.commands.search_and_learn import pixel_accuracy, select_hindsight
from arc25_fast.data.options import SyntheticConfig
from arc25_fast.data.sources import load_tasks
from arc25_fast.data.synthetic import run_code, synthetic_code_tasks, synthetic_tasks
from arc25_fast.data.tasks import Task
from arc25_fast.runtime.task_queue import TaskQueue
from arc25_fast.solving.solver import prompt_key

SMALL = ["--synthetic-max-calls", "1", "--synthetic-min-side", "3", "--synthetic-max-side", "6",
         "--synthetic-noise", "0"]


def test_hindsight_keeps_the_best_and_the_worst():
    entries = [{"accuracy": a, "id": i} for i, a in enumerate([0.5, 0.9, 0.1, 0.9, 0.3, 0.7])]
    assert [e["id"] for e in select_hindsight(entries, 4)] == [1, 3, 4, 2]  # ties: the earlier first
    assert [e["id"] for e in select_hindsight(entries, 3)] == [1, 3, 2]
    assert len(select_hindsight(entries, 10)) == 6
    assert [e["id"] for e in select_hindsight(entries, 4, "best")] == [1, 3, 5, 0]
    task = Task("t", [(np.zeros((2, 2), np.uint8), np.array([[1, 1], [0, 0]], np.uint8)),
                      (np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8))], [])
    outputs = [np.array([[1, 0], [0, 0]], np.uint8), np.ones((3, 2), np.uint8)]
    assert pixel_accuracy(outputs, task) == pytest.approx((0.75 + 0.0) / 2)  # another shape scores 0


def test_synthetic_task_sets_are_seeded_and_their_programs_produce_their_outputs():
    cfg = SyntheticConfig(max_calls=1, min_side=3, max_side=6, noise=0.0)
    a, b = synthetic_tasks(5, 7, cfg), synthetic_tasks(3, 7, cfg)
    assert [t.task_id for t in a[:3]] == [t.task_id for t in b]
    assert all((x[0] == y[0]).all() for t, u in zip(a, b) for x, y in zip(t.train, u.train))
    other = synthetic_tasks(3, 8, cfg)
    assert any(not np.array_equal(t.train[0][0], u.train[0][0]) for t, u in zip(b, other))
    assert all(len(t.train) == 3 and len(t.test) == 1 and max(t.test[0][0].shape) <= 6 for t in a)
    loaded, _ = load_tasks("synthetic:5:7", synthetic=cfg)
    assert [t.task_id for t in loaded] == [t.task_id for t in a]
    with pytest.raises(ValueError, match="use synthetic:COUNT"):
        load_tasks("synthetic:many")


def _claim_in_child(out: Path, task_ids: list[str]) -> subprocess.Popen:
    """A process that claims a task, says so, and waits to be killed."""
    code = ("import sys, time; from pathlib import Path; from arc25_fast.runtime.task_queue import TaskQueue\n"
            f"q = TaskQueue(Path({str(out)!r}), {task_ids!r}, lambda t: False)\n"
            "print(q.claim(), flush=True); time.sleep(600)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_queue_skips_live_claims_and_finished_tasks_and_retakes_a_killed_owners_task(tmp_path):
    ids = ["a", "b", "c"]
    child = _claim_in_child(tmp_path, ids)
    try:
        assert child.stdout.readline().strip() == "a"
        finished = {"b"}
        queue = TaskQueue(tmp_path, ids, finished.__contains__)
        assert queue.claim() == "c"  # a: claimed by a live process; b: finished
        assert TaskQueue(tmp_path, ids, finished.__contains__).claim() is None  # c is now claimed by this process
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert TaskQueue(tmp_path, ids, finished.__contains__).claim() == "a"  # its owner is gone
    finally:
        child.kill()
        child.wait()


def test_queue_claims_of_another_machine_expire_without_a_heartbeat(tmp_path):
    from arc25_fast.runtime import task_queue

    (tmp_path / "queue").mkdir()
    claim = tmp_path / "queue" / "a.claim"
    claim.write_text(json.dumps({"host": "elsewhere/boot", "pid": 1, "start": 1}))
    assert TaskQueue(tmp_path, ["a"], lambda t: False).claim() is None  # fresh: its owner may be alive
    old = time.time() - task_queue.LEASE_S - 1
    os.utime(claim, (old, old))
    assert TaskQueue(tmp_path, ["a"], lambda t: False).claim() == "a"


@pytest.fixture(scope="module")
def program_model(tmp_path_factory):
    """A tiny model trained briefly on single-call drawing programs: it writes programs that run, most of them
    wrong, so rounds have distinct outputs to relabel."""
    out = tmp_path_factory.mktemp("search") / "model_run"
    invoke(["train", "--task-source", "synthetic", *SMALL, "--no-lora", "--lr", "3e-3", "--max-steps", "120",
            "--warmup-steps", "10", "--max-tokens", "2048", "--eval-every", "0", "--verify-samples", "0",
            "--num-workers", "0", "--save-every", "0", "--output-dir", str(out)])
    return out / "model"


def search_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["search-and-learn", "--model", str(model), "--tasks", "synthetic:3:1000", *SMALL, "--rounds", "2",
            "--samples", "6", "--max-steps", "3", "--hindsight-per-task", "4", "--max-new-tokens", "40",
            "--temperature", "1.0", "--max-tokens", "2048", "--verify-samples", "0", "--workers", "1",
            "--threads", "1", "--output-dir", str(out), *extra]


def rounds_of(out: Path, task_id: str) -> list[dict]:
    return [json.loads(line) for line in (out / task_id / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rounds_relabel_what_programs_really_did_and_learn_between_rounds(program_model, tmp_path):
    out = tmp_path / "run"
    invoke(search_args(program_model, out))
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["tasks_done"] == 3 and [r["round"] for r in summary["per_round"]] == [1, 2]
    assert set(json.loads((out / "submission.json").read_text())) == {f"synthetic-1000-000{i}" for i in range(3)}
    tasks = {t.task_id: t for t in load_tasks("synthetic:3:1000", synthetic=SyntheticConfig(
        max_calls=1, min_side=3, max_side=6, noise=0.0))[0]}
    learned = 0
    for task_id, task in tasks.items():
        first, last = rounds_of(out, task_id)
        assert first["round"] == 1 and last["round"] == 2 and last["learning"] is None  # nothing after the last
        assert first["hindsight_examples"] == min(4, first["distinct_outputs_total"])
        if first["hindsight_examples"]:
            learned += 1
            assert first["learning"]["steps"] == 3 and first["learning"]["status"] == "done"
            assert (out / task_id / "adapter" / "adapter_config.json").exists()
        inputs = [x for x, _ in task.train] + [x for x, _ in task.test]
        lines = [json.loads(x) for x in (out / task_id / "hindsight.jsonl").read_text().splitlines()]
        assert len(lines) == first["distinct_outputs"] + last["distinct_outputs"]
        assert len({json.dumps(x["outputs"]) for x in lines}) == len(lines)  # one per distinct set of outputs
        for line in lines:  # relabelled with what the program really produced, on the task's own inputs
            assert [np.array(g).tolist() for g in line["inputs"]] == [g.tolist() for g in inputs]
            assert [o.tolist() for o in run_code(line["code"], inputs)] == line["outputs"]
        seconds = first["seconds"]
        assert seconds["total"] == pytest.approx(sum(seconds[p] for p in ("sampling", "execution", "learning",
                                                                          "overhead")))
    assert learned >= 1, "no task had a program that ran: the fixture model is too weak for this test"
    hindsight = (out / "hindsight.jsonl").read_text().splitlines()
    assert len(hindsight) == summary["hindsight_lines"] > 0


@pytest.mark.slow
def test_stop_when_solved_ends_a_task_after_its_first_solved_round(program_model, tmp_path):
    """A model taught the programs of two tasks solves one of them in round 1 and stops there; an unsolved task
    runs every round."""
    known = tmp_path / "known.jsonl"
    known.write_text("".join(json.dumps({"inputs": [x.tolist() for x in t.inputs],
                                         "outputs": [y.tolist() for y in t.outputs], "code": t.code}) + "\n"
                             for t in synthetic_code_tasks(2, 1000, SyntheticConfig(
                                 max_calls=1, min_side=3, max_side=6, noise=0.0))))
    invoke(["train", "--model", str(program_model), "--task-source", f"her:{known}", "--no-lora", "--lr", "3e-3",
            "--max-steps", "40", "--warmup-steps", "2", "--max-tokens", "2048", "--eval-every", "0",
            "--verify-samples", "0", "--num-workers", "0", "--save-every", "0", "--output-dir", str(tmp_path / "m")])
    out = tmp_path / "stop"
    invoke(search_args(tmp_path / "m" / "model", out, "--rounds", "3", "--stop-when-solved"))
    ran = [rounds_of(out, f"synthetic-1000-000{i}") for i in range(3)]
    for rounds in ran:  # it ran on while unsolved, and learnt nothing after the round that solved it
        assert [r["solved_train"] for r in rounds[:-1]] == [False] * (len(rounds) - 1)
        assert rounds[-1]["solved_train"] or len(rounds) == 3
        assert rounds[-1]["learning"] is None and all(r["learning"] for r in rounds[:-1])
    assert {len(r) for r in ran} == {1, 3}, "the taught model should solve one task at once and miss another"
    summary = json.loads((out / "search_summary.json").read_text())
    assert [r["tasks"] for r in summary["per_round"]] == [3] + [sum(len(r) == 3 for r in ran)] * 2
    first_solved = [len(r) for r in ran if r[-1]["solved_train"]]  # stopped tasks keep their answers after
    assert [r["solved_train"] for r in summary["per_round"]] == [sum(n <= k for n in first_solved) for k in (1, 2, 3)]
    assert summary["per_round"][-1]["pass@2"] == pytest.approx(summary["pass@2"])


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "the run ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_kill_9_continues_at_the_next_round_with_the_same_answers(program_model, tmp_path):
    # the rest's partial programs come from the rounds on disk too; two of the three tasks draw in two colours, and
    # their first programs are written for each colour apart
    # round 2 leaves out what each prompt drew in round 1 (--fresh-programs): on disk too
    rest = ("--rest-samples", "2", "--split-colors", "--synthetic-max-calls", "2")
    straight = tmp_path / "straight"
    invoke(search_args(program_model, straight, *rest))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "arc25_fast.cli", *search_args(program_model, out, *rest)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = out / "synthetic-1000-0001" / "rounds.jsonl"
    _wait_for(lambda: second.exists() and second.read_text().count("\n") == 1, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = second.read_text()
    assert not (out / "synthetic-1000-0001" / "task.json").exists()
    invoke(search_args(program_model, out, "--resume", *rest))
    assert second.read_text().startswith(before)  # round 1 kept as it was, not redone
    for i in range(3):
        task_id = f"synthetic-1000-000{i}"
        a, b = rounds_of(straight, task_id), rounds_of(out, task_id)
        assert [r["round"] for r in b] == [1, 2] and [r["samples"] for r in b] == [6, 6]
        for x, y in zip(a, b):
            assert x["candidates"] == y["candidates"] and x["attempts"] == y["attempts"]
            assert (x["learning"] or {}).get("losses") == (y["learning"] or {}).get("losses")
    assert json.loads((straight / "submission.json").read_text()) == json.loads((out / "submission.json").read_text())


def test_what_a_prompt_drew_is_kept_apart_by_the_partial_program_it_runs_before():
    """A colour's part and the rest of the other colour's call can be one prompt: what it drew for the part (run
    alone) is not left out of what it draws for the rest (run before the partial program)."""
    prompt = [5, 17, 33, 8]
    alone, before_a, before_b = prompt_key(prompt), prompt_key(prompt, "def task(img): A"), prompt_key(
        prompt, "def task(img): B")
    assert len({alone, before_a, before_b}) == 3
    assert alone == prompt_key(list(prompt)) and before_a == prompt_key(prompt, "def task(img): A")
    assert prompt_key(prompt + [0]) != alone


@pytest.mark.slow
def test_fresh_programs_never_draws_again_what_a_prompt_drew_in_an_earlier_round(program_model, tmp_path):
    """With --fresh-programs (the default), each round records what each prompt drew and no prompt draws a program it
    drew before; the first round draws what it would without the option, and a later round draws otherwise (the
    earlier programs' mass is taken out; ``test_decoding`` checks that the rest keeps its proportions)."""
    plain, fresh = tmp_path / "plain", tmp_path / "fresh"
    cooler = ("--rounds", "3", "--temperature", "0.3", "--top-p", "1.0")  # earlier programs hold more of the mass
    invoke(search_args(program_model, plain, *cooler, "--no-fresh-programs"))
    invoke(search_args(program_model, fresh, *cooler))  # --fresh-programs is the default
    changed = 0
    for i in range(3):
        before, after = rounds_of(plain, f"synthetic-1000-000{i}"), rounds_of(fresh, f"synthetic-1000-000{i}")
        assert before[0]["candidates"] == after[0]["candidates"]
        changed += sum(b["candidates"] != a["candidates"] for b, a in zip(before[1:], after[1:]))
        drawn: dict[str, set] = {}
        for r in after:
            assert sum(map(len, r["drawn"].values())) == r["samples"] == 6  # one prompt per task: no rest samples
            for key, ids in r["drawn"].items():
                assert not drawn.setdefault(key, set()) & {tuple(x) for x in ids}
                drawn[key] |= {tuple(x) for x in ids}
    assert changed > 0


@pytest.mark.slow
def test_no_learn_rounds_only_search(program_model, tmp_path):
    """--no-learn: every round samples, runs and relabels, none fine-tunes; later rounds still draw new programs."""
    out = tmp_path / "run"
    invoke(search_args(program_model, out, "--no-learn"))
    for i in range(3):
        task_id = f"synthetic-1000-000{i}"
        rounds = rounds_of(out, task_id)
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["learning"] is None and r["weights"] is None and r["hindsight_examples"] == 0 for r in rounds)
        assert not (out / task_id / "adapter").exists()
        drawn = [{tuple(x) for ids in r["drawn"].values() for x in ids} for r in rounds]
        assert len(drawn[1]) == 6 and not drawn[0] & drawn[1]
    assert json.loads((out / "search_summary.json").read_text())["hindsight_lines"] > 0


def test_no_learn_with_demo_weight_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["search-and-learn", "--tasks", "synthetic:2:1000", "--no-learn",
                                       "--demo-weight", "0.5", "--output-dir", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "--demo-weight" in lines[0] and "--no-learn" in lines[0], lines
    assert not (out / "config.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_share_one_queue_and_each_task_is_searched_once(program_model, tmp_path):
    out = tmp_path / "two"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "arc25_fast.cli", *search_args(program_model, out, "--rounds", "1")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    owners = {}
    for i in range(3):
        task_id = f"synthetic-1000-000{i}"
        assert len(rounds_of(out, task_id)) == 1  # searched once, by one rank
        owners[task_id] = json.loads((out / "queue" / f"{task_id}.claim").read_text())["pid"]
    assert set(owners.values()) <= {p.pid for p in procs}
    assert json.loads((out / "search_summary.json").read_text())["tasks_done"] == 3


@pytest.mark.slow
def test_a_task_that_fails_costs_only_itself(program_model, tmp_path):
    """A damaged weights file left by an interrupted round: that task is recorded as failed, the others are
    searched, and the submission holds every task."""
    out = tmp_path / "damaged"
    broken = out / "synthetic-1000-0001"
    broken.mkdir(parents=True)
    (broken / "weights.round1.safetensors").write_bytes(b"not a safetensors file")
    (broken / "rounds.jsonl").write_text(json.dumps({"round": 1, "weights": "weights.round1.safetensors",
                                                     "candidates": [], "hindsight": []}) + "\n")
    result = invoke(search_args(program_model, out, "--resume"))
    assert "task synthetic-1000-0001: failed:" in result.output
    summary = json.loads((out / "search_summary.json").read_text())
    assert summary["tasks_done"] == 2 and summary["tasks_failed"] == ["synthetic-1000-0001"]
    assert json.loads((broken / "task.json").read_text())["pass@2"] == 0.0
    assert len(json.loads((out / "submission.json").read_text())) == 3


@pytest.mark.slow
def test_sigterm_stops_after_the_round_in_flight_with_exit_75(program_model, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "arc25_fast.cli", *search_args(program_model, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "synthetic-1000-0000" / "rounds.jsonl"
    _wait_for(lambda: first.exists() and first.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output[-2000:]
    assert "continue with --resume" in output
    for rounds in out.glob("*/rounds.jsonl"):  # every line written is whole
        assert all(json.loads(line)["round"] >= 1 for line in rounds.read_text().splitlines())
