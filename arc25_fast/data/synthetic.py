"""Synthetic program tasks: random drawing programs run on random inputs (the hindsight "drawing" family).

The drawing functions below are the programs' whole vocabulary. A program is rendered as Python source that
calls them; running that source on the inputs gives exactly the outputs stored in the task (``run_code``).
Points are ``(row, column)``; pixels that fall outside an image are not drawn.
"""
from dataclasses import replace

import numpy as np
from numba import njit

from ..runtime.rng import Rng
from .options import SyntheticConfig
from .tasks import CodeTask, Task

LINE, RECTANGLE, HORIZONTAL_LINE, VERTICAL_LINE, PIXEL = range(5)
NAMES = ("draw_line", "draw_rectangle", "draw_horizontal_line", "draw_vertical_line", "draw_pixel")


@njit(cache=True, nogil=True)
def _set(img, r, c, color):
    if 0 <= r < img.shape[0] and 0 <= c < img.shape[1]:
        img[r, c] = color


@njit(cache=True, nogil=True)
def paint(img, kind, a, b, c, d, color):
    """The one definition of every drawing call; ``(a, b)`` and ``(c, d)`` are its points (or its row/column in a)."""
    if kind == PIXEL:
        _set(img, a, b, color)
    elif kind == HORIZONTAL_LINE:
        if 0 <= a < img.shape[0]:
            img[a, :] = color
    elif kind == VERTICAL_LINE:
        if 0 <= a < img.shape[1]:
            img[:, a] = color
    elif kind == RECTANGLE:
        for r in range(max(min(a, c), 0), min(max(a, c) + 1, img.shape[0])):
            for col in range(max(min(b, d), 0), min(max(b, d) + 1, img.shape[1])):
                img[r, col] = color
    else:
        n = max(abs(c - a), abs(d - b))
        if n == 0:
            _set(img, a, b, color)
            return
        sr = 1 if c >= a else -1
        sc = 1 if d >= b else -1
        for i in range(n + 1):
            _set(img, a + sr * ((2 * i * abs(c - a) + n) // (2 * n)), b + sc * ((2 * i * abs(d - b) + n) // (2 * n)),
                 color)


@njit(cache=True, nogil=True)
def run_calls(img, calls, skip):
    """Run calls (rows of kind, a, b, c, d, color) on a copy of img, leaving out call ``skip`` (-1: none)."""
    out = img.copy()
    for k in range(calls.shape[0]):
        if k != skip:
            paint(out, calls[k, 0], calls[k, 1], calls[k, 2], calls[k, 3], calls[k, 4], calls[k, 5])
    return out


@njit(cache=True, nogil=True)
def same_without(img, out, calls, skip):
    return np.array_equal(run_calls(img, calls, skip), out)


def draw_pixel(img: np.ndarray, point: tuple[int, int], color: int) -> None:
    paint(img, PIXEL, point[0], point[1], 0, 0, color)


def draw_horizontal_line(img: np.ndarray, y: int, color: int) -> None:
    paint(img, HORIZONTAL_LINE, y, 0, 0, 0, color)


def draw_vertical_line(img: np.ndarray, x: int, color: int) -> None:
    paint(img, VERTICAL_LINE, x, 0, 0, 0, color)


def draw_rectangle(img: np.ndarray, point1: tuple[int, int], point2: tuple[int, int], color: int) -> None:
    """A filled rectangle with opposite corners ``point1`` and ``point2``."""
    paint(img, RECTANGLE, point1[0], point1[1], point2[0], point2[1], color)


def draw_line(img: np.ndarray, point1: tuple[int, int], point2: tuple[int, int], color: int) -> None:
    """A straight line from ``point1`` to ``point2``, one pixel per step along its longer axis."""
    paint(img, LINE, point1[0], point1[1], point2[0], point2[1], color)


DSL = {f.__name__: f for f in (draw_line, draw_rectangle, draw_horizontal_line, draw_vertical_line, draw_pixel)}


def run_code(code: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a program's source (``def task(img): ... return img``) on copies of the inputs."""
    namespace = dict(DSL)
    exec(code, namespace)
    return [np.asarray(namespace["task"](img.copy()), dtype=np.uint8) for img in inputs]


def _random_call(rng: Rng, h: int, w: int) -> tuple[int, int, int, int, int, int]:
    r = rng.below
    kind, color = r(5), r(10)
    if kind == HORIZONTAL_LINE:
        return kind, r(h), 0, 0, 0, color
    if kind == VERTICAL_LINE:
        return kind, r(w), 0, 0, 0, color
    if kind == PIXEL:
        return kind, r(h), r(w), 0, 0, color
    return kind, r(h), r(w), r(h), r(w), color


def _render_call(kind: int, a: int, b: int, c: int, d: int, color: int) -> str:
    name = NAMES[kind]
    if kind == HORIZONTAL_LINE:
        return f"{name}(img, y={a}, color={color})"
    if kind == VERTICAL_LINE:
        return f"{name}(img, x={a}, color={color})"
    if kind == PIXEL:
        return f"{name}(img, point=({a}, {b}), color={color})"
    return f"{name}(img, point1=({a}, {b}), point2=({c}, {d}), color={color})"


def render_program(calls: np.ndarray) -> str:
    body = "".join(f"    {_render_call(*call)}\n" for call in calls.tolist())
    return f"def task(img):\n{body}    return img"


def _random_input(rng: Rng, cfg: SyntheticConfig) -> np.ndarray:
    h = rng.between(cfg.min_side, cfg.max_side)
    w = rng.between(cfg.min_side, cfg.max_side)
    if rng.py.random() < 1.0 - cfg.noise:
        return np.full((h, w), rng.below(10) if cfg.background < 0 else cfg.background, dtype=np.uint8)
    return rng.np.integers(0, 10, size=(h, w), dtype=np.uint8)


def random_program_task(rng: Rng, cfg: SyntheticConfig, task_id: str = "synthetic") -> CodeTask:
    """Random inputs (with ``cfg.drawn_calls``: the same random calls drawn on each) and a random program; calls that
    change no output are removed."""
    while True:
        inputs = [_random_input(rng, cfg) for _ in range(rng.between(cfg.min_inputs, cfg.max_inputs))]
        h = min(img.shape[0] for img in inputs)
        w = min(img.shape[1] for img in inputs)
        calls = np.array([_random_call(rng, h, w) for _ in range(rng.between(1, cfg.max_calls))], dtype=np.int64)
        backgrounds = {int(img[0, 0]) for img in inputs if img.min() == img.max()}
        if cfg.distinct_colors and backgrounds & set(calls[:, 5]):
            continue
        if cfg.drawn_calls:  # what earlier calls left on the canvas: the program's call is the one that differs
            drawn = np.array([_random_call(rng, h, w) for _ in range(rng.between(1, cfg.drawn_calls))], dtype=np.int64)
            if cfg.distinct_colors and backgrounds & set(drawn[:, 5]):
                continue
            inputs = [run_calls(img, drawn, -1) for img in inputs]
        outputs = [run_calls(img, calls, -1) for img in inputs]
        i = 0
        while i < len(calls):
            if all(same_without(img, out, calls, i) for img, out in zip(inputs, outputs)):
                calls = np.delete(calls, i, axis=0)
            else:
                i += 1
        if len(calls):
            return CodeTask(task_id, inputs, outputs, render_program(calls))


TASK_SET = 0x5E7  # the first key of a task set's random stream; training streams are keyed (seed, rank, stream, block)


def synthetic_code_tasks(count: int, seed: int, cfg: SyntheticConfig) -> list[CodeTask]:
    """The programs behind ``synthetic_tasks`` (same count, seed and config), each with its ``cfg.max_inputs + 1``
    inputs and outputs."""
    each = replace(cfg, min_inputs=cfg.max_inputs + 1, max_inputs=cfg.max_inputs + 1)
    return [random_program_task(Rng.for_block(TASK_SET, seed, i), each, f"synthetic-{seed}-{i:04d}")
            for i in range(count)]


def synthetic_tasks(count: int, seed: int, cfg: SyntheticConfig) -> list[Task]:
    """``count`` ARC tasks from random programs: ``cfg.max_inputs`` demo pairs and one test pair each (its output
    known). Each task has a stream of its own, so the first N tasks of a set do not depend on ``count``."""
    tasks = []
    for code_task in synthetic_code_tasks(count, seed, cfg):
        pairs = list(zip(code_task.inputs, code_task.outputs))
        tasks.append(Task(code_task.task_id, pairs[:-1], pairs[-1:]))
    return tasks
