"""search-and-learn at equal predictions: R rounds of K/R samples against one round of K, same tasks, same model.

For each R it runs ``arc25-fast search-and-learn`` (one process, the model resident) and reads its
``search_summary.json``: the wall time of the tasks (process start-up is reported apart: it is paid once per run,
not per round), split into sampling, execution, learning and overhead; the overhead's share after the first task
(the first pays one-time compilation); and what was solved (pass@2 of the ranking, pass@all: any program right).

    python benchmarks/search_and_learn.py --model runs/search-cpu/model --tasks synthetic:50:1000 \\
        --samples 32 --rounds 1,2,4 --json docs/benchmarks/search_and_learn.json -- --synthetic-max-calls 1 ...

Everything after ``--`` is passed to every run (the synthetic options must match the model's training).
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("sampling", "execution", "learning", "overhead")


def run(args: argparse.Namespace, rounds: int, out: Path, extra: list[str]) -> dict:
    per_round = args.samples // rounds
    rest = round(args.rest_share * per_round)
    cmd = [sys.executable, "-m", "arc25_fast.cli", "search-and-learn", "--model", args.model, "--tasks", args.tasks,
           "--rounds", str(rounds), "--samples", str(per_round), "--max-steps", str(args.max_steps),
           "--rest-samples", str(rest), "--output-dir", str(out), "--overwrite", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"search-and-learn --rounds {rounds} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "search_summary.json").read_text())
    infos = [json.loads(p.read_text()) for p in sorted(out.glob("*/task.json"))]
    order = sorted(infos, key=lambda i: (out / i["task_id"] / "task.json").stat().st_mtime)  # as they finished
    first, later = order[0], order[1:]
    phases = {p: sum(i["phases"][p] for i in infos) for p in PHASES}
    after_first = {p: sum(i["phases"][p] for i in later) for p in PHASES}
    return {"rounds": rounds, "samples_per_round": per_round, "rest_samples_per_round": rest, "process_seconds": wall,
            "setup_seconds": summary["setup_seconds"], "task_seconds": sum(phases.values()), "phases": phases,
            "first_task_seconds": sum(first["phases"].values()),
            "overhead_fraction_after_first": after_first["overhead"] / max(sum(after_first.values()), 1e-9),
            "pass@2": summary["pass@2"], "pass@all": summary["pass@all"], "solved_train": summary["solved_train"],
            "per_round": [{k: r[k] for k in ("round", "pass@2", "pass@all", "solved_train", "hindsight_examples")}
                          for r in summary["per_round"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks", default="synthetic:50:1000")
    parser.add_argument("--samples", type=int, default=32, help="K: samples per task over all rounds")
    parser.add_argument("--rounds", default="1,2,4", help="the values of R")
    parser.add_argument("--max-steps", type=int, default=8, help="optimizer steps per learning phase")
    parser.add_argument("--rest-share", type=float, default=0.0,
                        help="the share of each round's samples that go on from its best partial program "
                             "(--rest-samples)")
    parser.add_argument("--json", help="write the report here")
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in (int(x) for x in args.rounds.split(",")):
            results.append(run(args, r, Path(tmp) / f"r{r}", extra))
            print(json.dumps(results[-1]))
    base = results[0]["task_seconds"]
    print(f"\n| R | samples/round | task wall s | vs R={results[0]['rounds']} | sampling | execution | learning | "
          "overhead | overhead after task 1 | pass@2 | pass@all |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in results:
        x["ratio"] = x["task_seconds"] / base
        p = x["phases"]
        print(f"| {x['rounds']} | {x['samples_per_round']} | {x['task_seconds']:.1f} | {x['ratio']:.2f}x | "
              f"{p['sampling']:.1f} | {p['execution']:.1f} | {p['learning']:.1f} | {p['overhead']:.1f} | "
              f"{x['overhead_fraction_after_first']:.1%} | {x['pass@2']:.2f} | {x['pass@all']:.2f} |")
    if args.json:
        report = {"command": " ".join(sys.argv), "machine": platform.platform(), "processor": platform.processor(),
                  "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
