"""Solving one task by generation, shared by ``evaluate``, ``train --eval-tasks`` and ``search-and-learn``: its
prompts (encoded exactly as in training), the samples, the programs run in the sandbox pool, the ranking, and the
hindsight lines of the programs that ran (each checked by the ``her:`` source's own validation)."""
import ast
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.grids import DataError, dihedral, random_color_map
from ..data.options import Augmentation
from ..data.prompts import code_from_examples, output_from_examples
from ..data.tasks import Task, her_task
from ..runtime.rng import Rng
from ..sandbox.pool import RunResult, SandboxPool
from .decoding import Generated
from .options import Sampling, SolveOptions
from .refine import best_partial, color_tasks, join, rest_task
from .scoring import Candidate, extract_code, her_line, inverse_transform, parse_grid, same, score_task

MAX_TEXT = 4000  # characters of each sample kept in predictions.jsonl


def end_of_turn_ids(tokenizer, encoder) -> list[int]:
    """The tokens that end an answer: the chat template's end of turn, and the tokenizer's EOS."""
    special = set(tokenizer.all_special_ids)
    suffix = tokenizer.encode(encoder.chat.suffix, add_special_tokens=False)
    return sorted({t for t in suffix[:1] if t in special} | {tokenizer.eos_token_id} - {None})


def view(k: int, cmap: np.ndarray | None):
    """A grid transform: dihedral ``k``, then the colour map (None: colours kept)."""
    def t(grid: np.ndarray) -> np.ndarray:
        grid = dihedral(grid, k)
        return cmap[grid] if cmap is not None else np.ascontiguousarray(grid)
    return t


def random_views(views: Augmentation, n: int, rng: Rng) -> list[tuple[int, np.ndarray | None]]:
    """``n`` views of a task: the task as it is, then random rotations/reflections with colour permutations (those
    ``views`` allows)."""
    return [(0, None)] + [(rng.below(8) if views.dihedral else 0,
                           random_color_map(rng.np, views.keep_background) if views.colors else None)
                          for _ in range(n - 1)]


def output_prompts(solve: SolveOptions, task: Task, encoder,
                   rng: Rng | None) -> list[tuple[int, int, np.ndarray | None, list]]:
    """(test index, dihedral k, colour map, prompt ids) for each test input, under each voting augmentation."""
    prompts = []
    for i, (test_input, _) in enumerate(task.test):
        for k, cmap in random_views(solve.views, solve.vote_augmentations, rng) if solve.vote else [(0, None)]:
            t = view(k, cmap)
            sample = output_from_examples("solve", task.task_id, [(t(x), t(y)) for x, y in task.train],
                                          t(test_input), None)
            prompts.append((i, k, cmap, encoder.encode(sample).ids.tolist()))
    return prompts


def view_answer_ids(solve: SolveOptions, task: Task, encoder, test_index: int, grids: list[np.ndarray], k: int,
                    cmap: np.ndarray | None) -> tuple[list[int], list[list[int]]]:
    """The prompt of one view of a test input, and each grid's answer tokens in that view (end of turn included),
    encoded exactly as training encodes an answer."""
    t = view(k, cmap)
    prompt, answers = None, []
    for grid in grids:
        sample = output_from_examples("solve", task.task_id, [(t(x), t(y)) for x, y in task.train],
                                      t(task.test[test_index][0]), t(grid))
        encoded = encoder.encode(sample)
        start, end = (int(x) for x in encoded.spans[-1])
        ids = encoded.ids.tolist()
        if prompt is None:
            prompt = ids[:start]
        answers.append(ids[start:end])
    return prompt, answers


def rescore(solve: SolveOptions, task: Task, encoder, generator, adapter, per_test: list[list[Candidate]],
            rng: Rng) -> int:
    """Every distinct candidate grid scored by its summed log-probability under ``--score-augmentations`` views of
    its test input (the "product of experts"); returns the (view, grid) pairs scored."""
    scored = 0
    for i, candidates in enumerate(per_test):
        grids = {}
        for c in candidates:
            if c.test_outputs[0] is not None:
                grids.setdefault((c.test_outputs[0].shape, c.test_outputs[0].tobytes()), c.test_outputs[0])
        if not grids:
            continue
        totals = dict.fromkeys(grids, 0.0)
        for k, cmap in random_views(solve.views, solve.score_augmentations, rng):
            prompt, answers = view_answer_ids(solve, task, encoder, i, list(grids.values()), k, cmap)
            for key, lp in zip(grids, generator.score(prompt, answers, adapter)):
                totals[key] += lp
            scored += len(grids)
        for c in candidates:
            if c.test_outputs[0] is not None:
                c.score = totals[(c.test_outputs[0].shape, c.test_outputs[0].tobytes())]
    return scored


def score_output_task(solve: SolveOptions, task: Task, encoder, generator, adapter, sampling: Sampling,
                      rng: Rng) -> tuple[dict, list[dict], list[dict]]:
    prompts = output_prompts(solve, task, encoder, rng)
    if solve.sampler == "dfs":
        generated = generator.dfs([p[3] for p in prompts], solve.min_prob, sampling.max_new_tokens, solve.max_candidates,
                                  solve.max_seconds, adapter)
    else:
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
            record = {"test": i, "dihedral": k, "text": g.text[:MAX_TEXT], "parsed": grid is not None}
            if g.logprob is not None:
                record["logprob"] = g.logprob
            records.append(record)
    rescored = rescore(solve, task, encoder, generator, adapter, per_test, rng) if solve.score_augmentations else 0
    scores = [score_task(Task(task.task_id, task.train, [task.test[i]]), per_test[i]) for i in range(len(task.test))]
    attempts = [s["attempts"][0] for s in scores]
    result = {"samples": sum(len(c) for c in per_test), "parse_errors": parse_errors, "exec_errors": 0,
              "programs": 0, "train_correct": 0, "attempts": attempts, "rescored": rescored}
    if all(o is not None for _, o in task.test):
        for key in ("pass@1", "pass@2", "pass@all"):
            result[key] = float(all(s[key] for s in scores))
        result["arc_score"] = float(np.mean([s["arc_score"] for s in scores]))
    return result, records, []


def code_prompt(task: Task, encoder) -> list[int]:
    sample = code_from_examples("solve", task.task_id, [x for x, _ in task.train],
                                [y for _, y in task.train], None)
    return encoder.encode(sample).ids.tolist()


@dataclass
class Programs:
    """Sampled programs run on a task's train and test inputs: a ranking candidate per program that ran, a record
    per sample, and a hindsight line per program that produced every output."""

    candidates: list[Candidate]
    records: list[dict]
    her: list[dict]
    parse_errors: int
    exec_errors: int
    sandbox_seconds: float


    def extended(self, more: "Programs") -> "Programs":
        """These programs, then ``more`` (numbered after them)."""
        shift = len(self.records)
        return Programs(self.candidates + [replace(c, index=c.index + shift) for c in more.candidates],
                        self.records + more.records, self.her + more.her, self.parse_errors + more.parse_errors,
                        self.exec_errors + more.exec_errors, self.sandbox_seconds + more.sandbox_seconds)


def run_programs(task: Task, answers: list[Generated], pool: SandboxPool, then: str | None = None) -> Programs:
    """Each answer's program run on the task's train and test inputs; with ``then`` (a partial program), each
    program joined before it and run as one (``refine.join``)."""
    codes = [extract_code(g.text) for g in answers]
    if then is not None:
        codes = [None if c is None else join(c, then) for c in codes]
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
        if then is not None:
            record["runs_before"] = then[:MAX_TEXT]
        if r is not None:
            solved = sum(same(o, y) for o, (_, y) in zip(r.outputs[:n_demo], task.train))
            exec_errors += not r.ok
            candidates.append(Candidate(tuple(r.outputs[n_demo:]), solved, n_demo, i, code))
            record.update(demos_solved=solved, error=r.error or next((e for e in r.errors if e), None))
            if r.ok:
                her.append(her_line(task, code, r.outputs))
        records.append(record)
    return Programs(candidates, records, her, sum(c is None for c in codes), exec_errors, sandbox_seconds)


REST_SEED = 7_919  # the rest's samples come from a stream apart from the first ones


def sample_programs(task: Task, encoder, generator, sampling: Sampling, pool: SandboxPool, adapter: str | None = None,
                    known: list[dict] = (), drawn: dict[str, list[list[int]]] | None = None) -> Programs:
    """``sampling.n`` programs for a task, run. With ``--rest-samples`` R, the first n - R come from the task's
    prompt (with ``--split-colors``, shared out over its colours' parts, ``refine.color_tasks``) and the last R, in
    ``--rest-steps`` steps, from what the best partial program so far (among the programs before the step, and
    ``known``: hindsight lines of earlier rounds) leaves to do, each run before it (``refine``); from the task's
    prompt again (another seed) when no program is partial.

    ``drawn`` (``prompt_key`` -> token ids): what each prompt drew before, for the partial program it runs before;
    with it, no prompt draws a program it drew before for the same use (``decoding.sample``'s ``exclude``), and what
    each draws now is added to it. A colour's part and the rest of the other colours' call can be the same prompt:
    a program drawn for the part, run alone, can still be drawn for the rest, joined."""
    prompt, rest, steps = code_prompt(task, encoder), sampling.rest_samples, sampling.rest_steps
    n_first = sampling.n - rest
    parts = (color_tasks(task)[:n_first] if rest and sampling.split_colors else []) or [(None, task)]

    def draw(some_prompt: list[int], some: Sampling, then: str | None = None) -> list[Generated]:
        if drawn is None:
            return generator.generate([some_prompt], some, adapter)[0]
        earlier = drawn.setdefault(prompt_key(some_prompt, then), [])
        answers = generator.generate([some_prompt], some, adapter, exclude=[earlier])[0]
        earlier += [g.ids for g in answers]
        return answers

    ran = Programs([], [], [], 0, 0, 0.0)
    for k, (color, part) in enumerate(parts):
        first = replace(sampling, n=_share(n_first, len(parts), k), rest_samples=0)
        more = run_programs(task, draw(prompt if part is task else code_prompt(part, encoder), first), pool)
        if color is not None:
            for record in more.records:
                record["written_for_color"] = color
        ran = ran.extended(more)
    for step in range(steps if rest else 0):
        partial, then, step_prompt = best_partial(task, [*known, *ran.her]), None, prompt
        if partial is not None:
            then = partial["code"]
            step_prompt = code_prompt(rest_task(task, [np.asarray(o, dtype=np.uint8) for o in partial["outputs"]]),
                                      encoder)
        second = replace(sampling, n=_share(rest, steps, step), seed=sampling.seed + REST_SEED * (step + 1),
                         rest_samples=0)
        ran = ran.extended(run_programs(task, draw(step_prompt, second, then), pool, then))
    return ran


def prompt_key(prompt: list[int], then: str | None = None) -> str:
    """A prompt's name in ``drawn``: the digest of its token ids and of the partial program its programs run before."""
    digest = hashlib.sha256(np.asarray(prompt, dtype=np.int64).tobytes())
    if then is not None:
        digest.update(b"\0then\0" + then.encode())
    return digest.hexdigest()[:24]


def _share(total: int, parts: int, k: int) -> int:
    """Part ``k``'s share of ``total`` samples split over ``parts``, the first ones taking what does not divide."""
    return total // parts + (k < total % parts)


def score_code_task(solve: SolveOptions, task: Task, encoder, generator, adapter, sampling: Sampling,
                    pool: SandboxPool) -> tuple[dict, list[dict], list[dict]]:
    ran = sample_programs(task, encoder, generator, sampling, pool, adapter)
    scores = score_task(task, ran.candidates)
    result = {"samples": len(ran.records), "parse_errors": ran.parse_errors, "exec_errors": ran.exec_errors,
              "programs": len(ran.candidates), "train_correct": scores["train_correct"],
              "attempts": scores["attempts"], "sandbox_seconds": ran.sandbox_seconds,
              **{k: scores[k] for k in ("pass@1", "pass@2", "pass@all", "arc_score") if k in scores}}
    return result, ran.records, ran.her


def solve_task(solve: SolveOptions, task: Task, encoder, generator, sampling: Sampling, pool: SandboxPool | None,
               adapter: str | None) -> tuple[dict, list[dict]]:
    """One task's prediction row (scores when its test outputs are known) and its HER lines."""
    rng = Rng.for_block(solve.seed, 1 << 22, len(task.task_id), sum(map(ord, task.task_id)))
    if solve.prompt_kind == "code":
        result, records, her = score_code_task(solve, task, encoder, generator, adapter, sampling, pool)
    else:
        result, records, her = score_output_task(solve, task, encoder, generator, adapter, sampling, rng)
    result["attempts"] = [[a.tolist() for a in attempts] for attempts in result["attempts"]]
    row = {"task_id": task.task_id, "kind": solve.prompt_kind, "adapter": adapter, "adapter_sha256":
           adapter_digest(adapter), **result, "samples_detail": records}
    return row, her


def adapter_digest(path: str | None) -> str | None:
    """A hash of an adapter's weights (its safetensors or bin files), to tell which weights answered a task."""
    if path is None:
        return None
    digest = hashlib.sha256()
    for f in sorted(Path(path).glob("adapter_model.*")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def self_contained(code: str) -> str:
    """The program with the imports it relies on the sandbox for (``np``, ``numpy``), so it runs anywhere."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    bound = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imports = [line for name, line in (("np", "import numpy as np"), ("numpy", "import numpy"))
               if name in used and name not in bound]
    return "\n".join(imports + [code]) if imports else code


def checked_her(lines: list[dict], special_texts: list[str]) -> tuple[list[dict], Counter]:
    """The hindsight lines that the ``her:`` source accepts (its own validation, ``tasks.her_task``), programs made
    self-contained; and how many were left out, by reason."""
    kept, left_out = [], Counter()
    for line in lines:
        line = {**line, "code": self_contained(line["code"])}
        try:
            her_task(line, f"task {line.get('task_id')}", special_texts)
        except DataError as e:
            left_out[str(e).split(": ", 1)[-1].split(" (")[0][:80]] += 1
            continue
        kept.append(line)
    return kept, left_out


SCORES = ("pass@1", "pass@2", "pass@all", "arc_score")
COUNTS = ("samples", "parse_errors", "exec_errors", "programs", "train_correct")


def aggregate(rows: list[dict]) -> dict:
    """Scores averaged over the scored tasks (a failed task scores 0), counts summed over all."""
    scored = [r for r in rows if "pass@1" in r]
    totals = {k: sum(r.get(k, 0) for r in rows) for k in COUNTS}
    return {"tasks": len(rows), "tasks_scored": len(scored), "tasks_failed": sum("failed" in r for r in rows),
            "failed": sorted(r["task_id"] for r in rows if "failed" in r), **totals,
            **{k: float(np.mean([r[k] for r in scored])) if scored else None for k in SCORES},
            "train_correct_rate": totals["train_correct"] / totals["programs"] if totals["programs"] else None,
            "solved": sorted(r["task_id"] for r in scored if r["pass@2"])}


