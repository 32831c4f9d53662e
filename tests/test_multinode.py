"""Multi-node for real, on one machine: two "nodes" (two ``torchrun`` agents, ``--nnodes 2 --node-rank 0/1``, one
CPU rank each, rendezvous on 127.0.0.1, no ssh) give exactly what one node with two ranks gives, for ``train``,
``ttt`` and ``evaluate``; and killing one node stops the other within the collective timeout, with one line."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from arc25_fast.data.tokenizer import load_tokenizer
from arc25_fast.training.model import load_base_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")]
TRAIN = ["--max-tokens", "1024", "--grad-accum", "2", "--eval-every", "0", "--num-workers", "0",
         "--verify-samples", "0", "--save-every", "0", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nnodes: int, node_rank: int, nproc: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [shutil.which("torchrun"), "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node",
           str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port), str(ROOT / "train_ds.py"), *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=log.parent,
                            start_new_session=True)


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its ranks (torchrun starts ranks in sessions of their own), as when a node dies."""
    if agent.poll() is None:
        for pid in [c.pid for c in psutil.Process(agent.pid).children(recursive=True)] + [agent.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    agent.wait()


def run_both_ways(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """The same command on two nodes of one rank and on one node of two ranks; their output directories."""
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    port = free_port()
    nodes = [torchrun(2, r, 1, port, [*args, "--output-dir", str(two_nodes)], tmp_path / f"node{r}.log")
             for r in (0, 1)]
    single = None
    try:
        for r, node in enumerate(nodes):
            assert node.wait(timeout=600) == 0, (tmp_path / f"node{r}.log").read_text()[-3000:]
        single = torchrun(1, 0, 2, free_port(), [*args, "--output-dir", str(one_node)], tmp_path / "single.log")
        assert single.wait(timeout=600) == 0, (tmp_path / "single.log").read_text()[-3000:]
    finally:
        for p in nodes + [single]:
            if p is not None:
                kill_node(p)
    return two_nodes, one_node


def test_train_on_two_nodes_equals_two_ranks_on_one(tmp_path):
    two, one = run_both_ways(tmp_path, ["train", *TRAIN, "--max-steps", "2"])
    for r in (0, 1):
        got, want = (json.loads((d / f"rank{r}_summary.json").read_text()) for d in (two, one))
        assert got["status"] == "done" and got["trainable_weights_sha1"] == want["trainable_weights_sha1"]
        assert (two / f"rank{r}_micro_batches.txt").read_text() == (one / f"rank{r}_micro_batches.txt").read_text()
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (two, one)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert json.loads((two / "config.json").read_text())["resolved"]["world_size"] == 2


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    """Four small ARC tasks and a tiny saved base model."""
    root = tmp_path_factory.mktemp("arc")
    rng = np.random.default_rng(3)
    tasks = {}
    for t in range(4):
        pairs = [{"input": rng.integers(0, 10, (3, 3)).tolist(), "output": rng.integers(0, 10, (3, 3)).tolist()}
                 for _ in range(2)]
        tasks[f"t{t}"] = {"train": pairs, "test": [{"input": rng.integers(0, 10, (3, 3)).tolist()}]}
    (root / "x_challenges.json").write_text(json.dumps(tasks))
    tok = load_tokenizer("tiny")
    load_base_model("tiny", len(tok), torch.float32, "sdpa", 0).save_pretrained(root / "base")
    return root


def test_ttt_on_two_nodes_equals_two_ranks_on_one(arc, tmp_path):
    two, one = run_both_ways(tmp_path, ["ttt", "--tasks", f"kaggle:{arc / 'x_challenges.json'}", "--model",
                                        str(arc / "base"), "--max-steps", "2", "--max-tokens", "1024",
                                        "--verify-samples", "0", "--threads", "1"])
    for task in ("t0", "t1", "t2", "t3"):
        got, want = (json.loads((d / task / "task.json").read_text()) for d in (two, one))
        assert got["losses"] == want["losses"] and len(got["losses"]) == 2
        assert (two / task / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (one / task / "adapter" / "adapter_model.safetensors").read_bytes()


def test_evaluate_on_two_nodes_equals_two_ranks_on_one(arc, tmp_path):
    two, one = run_both_ways(tmp_path, ["evaluate", "--tasks", f"kaggle:{arc / 'x_challenges.json'}", "--model",
                                        str(arc / "base"), "--samples", "2", "--temperature", "0.7",
                                        "--max-new-tokens", "8", "--verify-samples", "0", "--threads", "1"])
    for r in (0, 1):
        got, want = ([json.loads(x) for x in (d / f"predictions_rank{r}.jsonl").read_text().splitlines()]
                     for d in (two, one))
        assert [(x["task_id"], [s["text"] for s in x["samples_detail"]]) for x in got] == \
            [(x["task_id"], [s["text"] for s in x["samples_detail"]]) for x in want]
    assert sorted(json.loads((two / "submission.json").read_text())) == ["t0", "t1", "t2", "t3"]


def test_killing_one_node_stops_the_other_within_the_collective_timeout(tmp_path):
    out, port = tmp_path / "run", free_port()
    args = ["train", *TRAIN, "--max-steps", "500", "--collective-timeout", "10", "--output-dir", str(out)]
    nodes = [torchrun(2, r, 1, port, args, tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert all(n.poll() is None for n in nodes), (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.2)
        kill_node(nodes[1])
        killed = time.monotonic()
        code = nodes[0].wait(timeout=120)
        waited = time.monotonic() - killed
        log = (tmp_path / "node0.log").read_text()
        assert code != 0 and waited < 10 + 60, (waited, log[-3000:])
        errors = [x for x in log.splitlines() if "Error: rank 0:" in x]
        assert len(errors) == 1 and "a peer rank stalled or died" in errors[0], log[-3000:]
    finally:
        for n in nodes:
            kill_node(n)


def test_the_launcher_error_line_starts_its_own_line():
    """Under a launcher a rank's error is prefixed with its rank and starts on a fresh line (another rank's progress
    bar may have left one open)."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-c", "from arc25_fast.cli import main; main()", "train", "--max-steps",
                           "0"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("\nError: rank 1: --max-steps: must be at least 1")
