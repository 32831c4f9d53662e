"""Programs that go on from a partial program: one that draws part of every demo output and nothing wrong.

A program is *partial* when, on every demo pair, each cell it changes takes the expected output's colour and it
changes some but not all of the cells that differ. What it *leaves to do* is a task of its own: the task's inputs,
and its demo outputs with the partial program's changes taken back out. A program written for that task, run before
the partial one (whose changes show in the outputs, so they go on top), is one program for the original task; it is
run and ranked like any other. The model so only ever reads inputs like the task's own, and a task that needs two
steps is two tasks it can solve one step at a time.

A task whose outputs change cells to several colours is also split by colour (``color_tasks``): each part keeps one
colour's changes, so a model that writes one call at a time finds the call drawn on top as a partial program.
"""
import ast
from collections import Counter

import numpy as np

from ..data.tasks import Task

ENTRY = "task"


def progress(outputs: list[np.ndarray], task: Task) -> float | None:
    """How much of the demo outputs a program drew, or None unless it is partial (see the module docstring): the
    mean over demo pairs of the share of differing cells it got right."""
    shares = []
    for out, (x, y) in zip(outputs, task.train):
        if out.shape != y.shape or x.shape != y.shape:
            return None
        changed, needed = out != x, y != x
        if (changed & (out != y)).any():
            return None
        shares.append(float(changed.sum() / needed.sum()) if needed.any() else 1.0)
    share = float(np.mean(shares)) if shares else 0.0
    return share if 0.0 < share < 1.0 else None


def best_partial(task: Task, lines: list[dict]) -> dict | None:
    """The hindsight line (``code``, ``outputs`` on the train then test inputs) of the partial program that draws
    the most; the earliest among equals; None when no program is partial."""
    best, most = None, 0.0
    for line in lines:
        share = progress([np.asarray(o) for o in line["outputs"][:len(task.train)]], task)
        if share is not None and share > most:
            best, most = line, share
    return best


def rest_task(task: Task, outputs: list[np.ndarray]) -> Task:
    """What a partial program leaves to do: the task's demo outputs with the changes it made (``outputs``, on the
    demo inputs) taken back out."""
    return Task(task.task_id, [(x, np.where(o != x, x, y)) for o, (x, y) in zip(outputs, task.train)], task.test)


def color_tasks(task: Task) -> list[tuple[int, Task]]:
    """The task split by the colours its demo outputs change cells to, most cells first: each colour, and the task
    with only its changes (the others taken back out), so that the part one call draws is a task of its own. Empty
    where the outputs change cells to fewer than two colours or differ in shape from their inputs."""
    if any(x.shape != y.shape for x, y in task.train):
        return []
    cells = Counter()
    for x, y in task.train:
        cells.update(y[y != x].tolist())
    if len(cells) < 2:
        return []
    return [(c, Task(task.task_id, [(x, np.where(y == c, y, x)) for x, y in task.train], task.test))
            for c, _ in cells.most_common()]


def join(first: str, then: str) -> str | None:
    """One program that runs ``first``'s ``task`` and then ``then``'s on its result, or None when either is not a
    module defining ``task(grid)``.

    Two single-function programs whose first one returns its (changed) argument are joined into one function body,
    the form the model writes; otherwise each module is kept whole in a scope of its own, so their helpers cannot
    clash."""
    try:
        a, b = ast.parse(first), ast.parse(then)
    except SyntaxError:
        return None
    fa, fb = _entry(a), _entry(b)
    if fa is None or fb is None:
        return None
    arg = fa.args.args[0].arg
    returns = [n for n in ast.walk(fa) if isinstance(n, ast.Return)]
    last = fa.body[-1]
    if (len(a.body) == len(b.body) == 1 and returns == [last] and isinstance(last.value, ast.Name)
            and last.value.id == arg and not _nested(fa) and fb.args.args[0].arg == arg):
        fa.body = fa.body[:-1] + fb.body
        return ast.unparse(a)
    steps = [ast.FunctionDef(name=f"_step{k}", args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                                                                  kw_defaults=[], defaults=[]),
                             body=tree.body + [ast.Return(ast.Name(ENTRY, ast.Load()))], decorator_list=[])
             for k, tree in ((1, a), (2, b))]
    call = ast.parse(f"def {ENTRY}(grid):\n    return _step2()(_step1()(grid))").body
    code = ast.unparse(ast.fix_missing_locations(ast.Module(steps + call, [])))
    try:
        compile(code, "<joined>", "exec")  # e.g. "from m import *" is not allowed inside a function
    except SyntaxError:
        return None
    return code


def _entry(tree: ast.Module) -> ast.FunctionDef | None:
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == ENTRY]
    if len(found) != 1 or len(found[0].args.args) != 1:
        return None
    return found[0]


def _nested(fn: ast.FunctionDef) -> bool:
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef)
               for n in ast.walk(fn) if n is not fn)
