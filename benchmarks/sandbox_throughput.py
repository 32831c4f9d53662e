"""Programs executed per second by the sandbox pool, with every isolation layer and with none (the same pool: a
fresh child of a warm worker per program), against running them in this interpreter (no isolation at all).

    python benchmarks/sandbox_throughput.py --programs 2000 --workers 1,2 --json docs/benchmarks/sandbox_throughput.json

The programs are the synthetic source's drawing programs, each run on its own inputs (1 to 3 grids up to 30x30),
so every result can be checked against the outputs the program is known to produce. Start-up is the time from
creating the pool to every worker being ready.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from arc25_fast.data.options import SyntheticConfig
from arc25_fast.data.synthetic import random_program_task, run_code
from arc25_fast.runtime.rng import Rng
from arc25_fast.sandbox.isolation import NO_LAYERS, Layers
from arc25_fast.sandbox.pool import SandboxPool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", type=int, default=2000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = Rng.for_block(0, 0, 0, 0)
    tasks = [random_program_task(rng, SyntheticConfig()) for _ in range(args.programs)]
    start = time.perf_counter()
    for t in tasks:
        run_code(t.code, t.inputs)
    in_process = len(tasks) / (time.perf_counter() - start)
    report = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "programs": len(tasks), "in_process_programs_per_s": in_process, "pool": []}
    print(f"in this interpreter (no isolation): {in_process:,.0f} programs/s")
    for workers in [int(w) for w in args.workers.split(",")]:
        rates = {}
        for name, layers in (("no layers", NO_LAYERS), ("every layer", Layers())):
            start = time.perf_counter()
            with SandboxPool(workers, layers=layers) as pool:
                startup = time.perf_counter() - start
                pool.run([(tasks[0].code, tasks[0].inputs)] * workers)
                start = time.perf_counter()
                results = pool.run([(t.code, t.inputs) for t in tasks])
                rates[name] = rate = len(tasks) / (time.perf_counter() - start)
                isolation = pool.isolation
            right = sum(r.ok and all(np.array_equal(a, b) for a, b in zip(r.outputs, t.outputs))
                        for r, t in zip(results, tasks))
            report["pool"].append({"workers": workers, "layers": isolation["layers"], "programs_per_s": rate,
                                   "startup_seconds": startup, "correct": right,
                                   "cost_of_isolation": in_process / rate,
                                   "vs_no_layers": rate / rates["no layers"]})
            print(f"sandbox pool, {workers} worker(s), {name} ({', '.join(isolation['layers']) or '-'}): "
                  f"{rate:,.0f} programs/s ({rate / rates['no layers']:.2f}x the pool without layers), start-up "
                  f"{startup:.2f} s, {right}/{len(tasks)} reproduce their outputs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
