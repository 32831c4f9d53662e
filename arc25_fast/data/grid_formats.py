"""Grid text formats, chosen by name (``--grid-format``): a base and optional modifiers joined by ``+``.

- ``minimal``: one line of digits per row, e.g. ``012``;  ``spaced``: digits separated by spaces, ``0 1 2``.
- ``row-numbers``: each row starts with its 1-based number and a space, ``1 012``.
- ``shape``: the grid is fenced with a header, `````grid shape: 3x3`` ... `````.

The default, ``shape+row-numbers+minimal``, renders a 2x3 grid as::

    ```grid shape: 2x3
    1 012
    2 340
    ```

A format is a handful of fixed pieces of text around and between digits; ``to_text`` is the reference
rendering and ``arc25_fast.kernels.grid_tokens`` writes the same text's token ids from the same pieces.
"""
from dataclasses import dataclass

import numpy as np

DEFAULT_GRID_FORMAT = "shape+row-numbers+minimal"
BASES = {"minimal": "", "spaced": " "}
MODIFIERS = ("shape", "row-numbers")


@dataclass(frozen=True)
class GridFormat:
    name: str
    shape_header: bool
    row_numbers: bool
    prefix: str  # text before the first digit
    hw_sep: str  # between the height and width digits of the header
    header_end: str  # after the width, before the first row
    rownum_end: str  # after a row number, before the row's first cell
    cell_sep: str
    row_sep: str
    suffix: str  # text after the last digit

    @property
    def pieces(self) -> tuple[str, str, str, str, str]:
        """The fixed pieces between digits, in the order of the kernel's table."""
        return self.hw_sep, self.header_end, self.rownum_end, self.cell_sep, self.row_sep

    def to_text(self, grid: np.ndarray) -> str:
        rows = [self.cell_sep.join(map(str, row)) for row in grid.tolist()]
        if self.row_numbers:
            rows = [f"{i}{self.rownum_end}{row}" for i, row in enumerate(rows, start=1)]
        body = self.row_sep.join(rows)
        if self.shape_header:
            body = f"{grid.shape[0]}{self.hw_sep}{grid.shape[1]}{self.header_end}{body}"
        return f"{self.prefix}{body}{self.suffix}"


def grid_format(name: str = DEFAULT_GRID_FORMAT) -> GridFormat:
    parts = name.split("+")
    base, modifiers = parts[-1], parts[:-1]
    if base not in BASES or any(m not in MODIFIERS for m in modifiers) or len(set(modifiers)) != len(modifiers):
        raise ValueError(f"unknown grid format {name!r}: use [shape+][row-numbers+]minimal|spaced")
    shape = "shape" in modifiers
    return GridFormat(
        name=name, shape_header=shape, row_numbers="row-numbers" in modifiers,
        prefix="```grid shape: " if shape else "", hw_sep="x", header_end="\n", rownum_end=" ",
        cell_sep=BASES[base], row_sep="\n", suffix="\n```" if shape else "",
    )
