"""Write ARC grids directly as token ids.

A grid format is compiled (see ``arc25_fast.data.grid_formats``) into one int32 table:

    [0:10]   token id of each digit 0..9
    [10]     1 if the body starts with the shape ``H x W`` header digits
    [11]     1 if each row starts with its 1-based row number
    [12:17]  lengths of the five fixed pieces below
    [17:]    the pieces' token ids, concatenated: hw_sep, header_end, rownum_end, cell_sep, row_sep

The "body" of a grid runs from its first digit to its last digit; everything between two digits is a fixed
piece whose token ids were computed once by the tokenizer. Digits are always single pre-tokens in the
supported tokenizers, so the body's ids are exactly what the tokenizer would produce for the body's text.
"""
import numpy as np
from numba import njit

N_PIECES = 5
HEADER = 17


@njit(cache=True, nogil=True)
def _n_digits(x: int) -> int:
    n = 1
    while x >= 10:
        x //= 10
        n += 1
    return n


@njit(cache=True, nogil=True)
def _write_int(x, out, pos, table):
    n = _n_digits(x)
    for i in range(n - 1, -1, -1):
        out[pos + i] = table[x % 10]
        x //= 10
    return pos + n


@njit(cache=True, nogil=True)
def _write_piece(k, out, pos, table):
    start = HEADER
    for i in range(k):
        start += table[12 + i]
    for i in range(table[12 + k]):
        out[pos] = table[start + i]
        pos += 1
    return pos


@njit(cache=True, nogil=True)
def grid_body_length(h: int, w: int, table: np.ndarray) -> int:
    n = h * w + h * (w - 1) * table[15] + (h - 1) * table[16]
    if table[10]:
        n += _n_digits(h) + table[12] + _n_digits(w) + table[13]
    if table[11]:
        for r in range(1, h + 1):
            n += _n_digits(r)
        n += h * table[14]
    return n


@njit(cache=True, nogil=True)
def grid_body_tokens(grid: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Token ids of one grid's body (first digit to last digit)."""
    h, w = grid.shape
    out = np.empty(grid_body_length(h, w, table), dtype=np.int32)
    pos = 0
    if table[10]:
        pos = _write_int(h, out, pos, table)
        pos = _write_piece(0, out, pos, table)
        pos = _write_int(w, out, pos, table)
        pos = _write_piece(1, out, pos, table)
    for r in range(h):
        if r > 0:
            pos = _write_piece(4, out, pos, table)
        if table[11]:
            pos = _write_int(r + 1, out, pos, table)
            pos = _write_piece(2, out, pos, table)
        for c in range(w):
            if c > 0:
                pos = _write_piece(3, out, pos, table)
            out[pos] = table[grid[r, c]]
            pos += 1
    return out
