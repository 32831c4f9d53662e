"""An independent test set of drawing tasks on varied canvases, made apart from the training generator
(``arc25_fast.data.synthetic`` is not imported): every demo input has its own size and its own one-colour background,
never the drawn colour, and every call is visible in every demo. Written as a Kaggle challenges/solutions pair, so
``evaluate --tasks kaggle:PATH`` and ``search-and-learn --tasks kaggle:PATH`` read it like any ARC set.

    python benchmarks/varied_tasks.py --out runs/varied/one_call_challenges.json --calls 1 --count 60
    python benchmarks/varied_tasks.py --out runs/varied/two_calls_challenges.json --calls 2 --count 60

Calls whose drawing is unambiguous whatever the rasteriser: pixels, horizontal and vertical lines, filled
rectangles and lines that are horizontal, vertical or diagonal, written as the DSL's programs are.
"""
import argparse
import json
import random
from pathlib import Path


def paint(grid: list[list[int]], call: tuple) -> None:
    kind, args, color = call
    h, w = len(grid), len(grid[0])

    def put(r, c):
        if 0 <= r < h and 0 <= c < w:
            grid[r][c] = color

    if kind == "pixel":
        put(*args[0])
    elif kind == "horizontal":
        for c in range(w):
            put(args[0], c)
    elif kind == "vertical":
        for r in range(h):
            put(r, args[0])
    elif kind == "rectangle":
        (r1, c1), (r2, c2) = args
        for r in range(min(r1, r2), max(r1, r2) + 1):
            for c in range(min(c1, c2), max(c1, c2) + 1):
                put(r, c)
    else:  # a horizontal, vertical or diagonal line
        (r1, c1), (r2, c2) = args
        n = max(abs(r2 - r1), abs(c2 - c1))
        for i in range(n + 1):
            put(r1 + i * (r2 > r1) - i * (r2 < r1), c1 + i * (c2 > c1) - i * (c2 < c1))


def source(call: tuple) -> str:
    kind, args, color = call
    if kind == "pixel":
        return f"draw_pixel(img, point=({args[0][0]}, {args[0][1]}), color={color})"
    if kind == "horizontal":
        return f"draw_horizontal_line(img, y={args[0]}, color={color})"
    if kind == "vertical":
        return f"draw_vertical_line(img, x={args[0]}, color={color})"
    name = "draw_rectangle" if kind == "rectangle" else "draw_line"
    (r1, c1), (r2, c2) = args
    return f"{name}(img, point1=({r1}, {c1}), point2=({r2}, {c2}), color={color})"


def random_call(rng: random.Random, h: int, w: int, color: int) -> tuple:
    kind = rng.choice(["pixel", "horizontal", "vertical", "rectangle", "line"])
    if kind == "pixel":
        return kind, ((rng.randrange(h), rng.randrange(w)),), color
    if kind == "horizontal":
        return kind, (rng.randrange(h),), color
    if kind == "vertical":
        return kind, (rng.randrange(w),), color
    r1, c1 = rng.randrange(h), rng.randrange(w)
    if kind == "rectangle":
        return kind, ((r1, c1), (rng.randrange(h), rng.randrange(w))), color
    room = {"row": (0, 1, w - 1 - c1), "column": (1, 0, h - 1 - r1), "diagonal": (1, 1, min(h - 1 - r1, w - 1 - c1)),
            "anti-diagonal": (1, -1, min(h - 1 - r1, c1))}
    dr, dc, most = rng.choice([v for v in room.values() if v[2] > 0] or [(0, 0, 0)])
    n = rng.randint(1, most) if most else 0
    return kind, ((r1, c1), (r1 + dr * n, c1 + dc * n)), color


def run(calls: list[tuple], grid: list[list[int]]) -> list[list[int]]:
    out = [row[:] for row in grid]
    for call in calls:
        paint(out, call)
    return out


def make_task(rng: random.Random, n_calls: int, pairs: int, min_side: int, max_side: int) -> dict:
    while True:
        sizes = [(rng.randint(min_side, max_side), rng.randint(min_side, max_side)) for _ in range(pairs)]
        h, w = min(s[0] for s in sizes), min(s[1] for s in sizes)
        colors = rng.sample(range(10), n_calls)
        calls = [random_call(rng, h, w, c) for c in colors]
        grids = []
        for sh, sw in sizes:
            background = rng.choice([c for c in range(10) if c not in colors])
            grids.append([[background] * sw for _ in range(sh)])
        outputs = [run(calls, g) for g in grids]
        visible = all(run(calls[:i] + calls[i + 1:], g) != out for i in range(len(calls))
                      for g, out in zip(grids, outputs))
        if visible:
            code = "def task(img):\n" + "".join(f"    {source(c)}\n" for c in calls) + "    return img"
            return {"pairs": list(zip(grids, outputs)), "code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the challenges file; the solutions file is written beside it")
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--demos", type=int, default=3)
    ap.add_argument("--min-side", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=12)
    ap.add_argument("--seed", type=int, default=2025)
    args = ap.parse_args()
    rng = random.Random(f"varied|{args.calls}|{args.seed}")
    challenges, solutions, programs = {}, {}, {}
    for i in range(args.count):
        task = make_task(rng, args.calls, args.demos + 1, args.min_side, args.max_side)
        task_id = f"varied{args.calls}-{i:03d}"
        *train, test = task["pairs"]
        challenges[task_id] = {"train": [{"input": a, "output": b} for a, b in train], "test": [{"input": test[0]}]}
        solutions[task_id] = [test[1]]
        programs[task_id] = task["code"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(challenges))
    out.with_name(out.name.replace("challenges", "solutions")).write_text(json.dumps(solutions))
    out.with_name(out.name.replace("challenges", "programs")).write_text(json.dumps(programs, indent=1))
    print(f"{args.count} tasks, {args.calls} call(s) each, sides {args.min_side}-{args.max_side}: {out}")


if __name__ == "__main__":
    main()
