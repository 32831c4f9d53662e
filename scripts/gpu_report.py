"""The tables of ``scripts/gpu_check.sh``'s report, from the JSON files its sections wrote (a missing file: that
section gave nothing to report)."""
import json
import sys
from pathlib import Path


def load(out: Path, name: str):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def training(report: dict) -> list[str]:
    lines = ["## Training step (`benchmarks/step_overhead.py`)", "",
             "| budget | mode | engine | tokens/s | step ms | fwd / bwd / opt ms | MFU | peak GiB | syncs | ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        split = r.get("split_ms")
        lines.append(f"| {r['budget']} | {r['mode']} | {r['engine']} | {fmt(r.get('tokens_per_s'))} | "
                     f"{fmt(r.get('step_ms'), '.1f')} | "
                     f"{' / '.join(fmt(split[k], '.1f') for k in ('forward', 'backward', 'optimizer')) if split else '-'}"
                     f" | {fmt(100 * r['mfu'], '.1f') + ' %' if 'mfu' in r else '-'} | {fmt(r.get('peak_gib'), '.1f')} | "
                     f"{r.get('syncs', '-')} | {r.get('ops', r.get('error', '-'))} |")
    for engine, p in (report.get("profiles") or {}).items():
        lines += ["", f"Profile of one step, {engine} engine, full fine-tuning, first budget: {p['device_ms']:.1f} ms "
                  f"of device time; host calls {p['host_calls']}", "", "| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['name']}` | {k['ms']:.2f} | {k['calls']} |" for k in p["top_kernels"][:10]]
    return lines


def trl(report: dict) -> list[str]:
    lines = ["## TRL side by side (`benchmarks/trl_side_by_side.py`)", "", "| trainer | real tokens/s | samples/s | "
             "peak MiB | arc25-fast is (tokens/s) |", "|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        lines.append(f"| {name} | {s['tokens_per_s']:,.0f} | {s['samples_per_s']:.2f} | "
                     f"{s['peak_memory_bytes'] / 2 ** 20:,.0f} | {s['ours_tokens_per_s_ratio']:.2f}x |")
    loss = report["first_batch_loss"]
    return lines + ["", f"First-batch loss from the same weights: TRL {loss['trl']:.5f}, arc25-fast "
                        f"{loss['arc25_fast']:.5f} (same token ids: {loss['same_tokens']})."]


SAMPLERS = ("generate", "shared_prefix", "static_step", "cuda_graph")


def sampling(report: dict) -> list[str]:
    lines = [f"## Sampling (`benchmarks/decoding_speed.py`, {report.get('device')}, {report.get('dtype')})", "",
             "generated tokens/s (x `generate`); shared prefix: transformers' forward per token, static step: the "
             "fixed-shape step, cuda graph: that step replayed", "",
             "| K | " + " | ".join(n.replace("_", " ") for n in SAMPLERS) + " |", "|---|" + "---|" * len(SAMPLERS)]
    for r in report["sampling"]:
        cells = []
        for name in SAMPLERS:
            m = r.get(name, {})
            cells.append(f"{fmt(m['generated_tokens_per_s'])} ({fmt(m.get('vs_generate'), '.2f')}x)" if "seconds" in m
                         else m.get("error", "-"))
        lines.append(f"| {r['k']} | " + " | ".join(cells) + " |")
    if report.get("fresh"):
        lines += ["", "sampling without replacement (`--fresh-programs`): K more samples leaving out K drawn before",
                  "", "| K | time vs plain | repeats of an earlier sample: plain / fresh |", "|---|---|---|"]
        lines += [f"| {r['k']} | {r['fresh_vs_plain']:.2f}x | {r['plain_repeats']} / {r['fresh_repeats']} of "
                  f"{r['samples']} |" for r in report["fresh"]]
    return lines


def search(report: dict) -> list[str]:
    seconds = report["seconds"]
    total = sum(seconds.values()) or 1.0
    return ["## search-and-learn time split", "", "| phase | seconds | share |", "|---|---|---|"] + \
        [f"| {k} | {v:.1f} | {100 * v / total:.0f} % |" for k, v in seconds.items()]


def sandbox(report: dict) -> list[str]:
    return ["## Sandbox (`benchmarks/sandbox_throughput.py`)", "", "| workers | layers | programs/s | vs no layers |",
            "|---|---|---|---|"] + [f"| {p['workers']} | {', '.join(p['layers']) or '-'} | {p['programs_per_s']:,.0f} "
                                    f"| {p['vs_no_layers']:.2f}x |" for p in report["pool"]]


def main() -> None:
    out = Path(sys.argv[1])
    for name, render in (("step_overhead.json", training), ("trl.json", trl), ("sampling.json", sampling),
                         ("search.json", search), ("sandbox.json", sandbox)):
        report = load(out, name)
        if report is not None:
            print()
            print("\n".join(render(report)))


if __name__ == "__main__":
    main()
