"""ARC grids: validation and the augmentations that preserve a task's meaning."""
from typing import Any

import numpy as np

MAX_SIDE = 30
N_COLORS = 10


class DataError(ValueError):
    """Bad input data; the message is one line naming the file, the task (or line) and the problem."""


def where(source: str, task_id: str | None = None) -> str:
    return f"{source}: task {task_id}" if task_id is not None else source


def to_grid(value: Any, context: str) -> np.ndarray:
    """Validate a JSON grid (list of rows of colours) and return it as a uint8 array."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{context}: grid is empty or not a list of rows")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise DataError(f"{context}: row {r} is empty or not a list")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise DataError(f"{context}: grid is not rectangular (row 0 has {width} cells, row {r} has {len(row)})")
        for c, cell in enumerate(row):
            if type(cell) is not int or not 0 <= cell < N_COLORS:
                raise DataError(f"{context}: colour {cell!r} at row {r}, column {c} is outside 0..9")
    if len(value) > MAX_SIDE or width > MAX_SIDE:
        raise DataError(f"{context}: grid is {len(value)}x{width}, larger than {MAX_SIDE}x{MAX_SIDE}")
    return np.array(value, dtype=np.uint8)


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 symmetries of the square as a view: rotation by k*90 degrees, after a transpose if k >= 4."""
    if k >= 4:
        grid = grid.T
    k %= 4
    if k == 1:
        return grid.T[::-1]
    if k == 2:
        return grid[::-1, ::-1]
    if k == 3:
        return grid.T[:, ::-1]
    return grid


def random_color_map(rng: np.random.Generator, keep_background: bool) -> np.ndarray:
    """A permutation of the 10 colours as a lookup table, optionally keeping 0 (the usual background) fixed."""
    if keep_background:
        return np.concatenate([[0], 1 + rng.permutation(N_COLORS - 1)]).astype(np.uint8)
    return rng.permutation(N_COLORS).astype(np.uint8)
