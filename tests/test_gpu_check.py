"""``scripts/gpu_check.sh --dry-run``: every section of the GPU check runs at tiny sizes on the CPU and the report
holds what it promises, so the script is known to work before a GPU is rented for it."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "PYTHON": "python"}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    first = lines.index("| section | box (s) | status | seconds |") + 2
    rows = [line.strip("|").split(" | ") for line in lines[first:first + 6]]
    sections = {cells[0].strip(): cells[2].strip() for cells in rows}
    assert len(sections) == 6, report
    bad = {k: v for k, v in sections.items() if v != "ok" and not v.startswith("skipped")}
    assert not bad, (bad, done.stdout[-3000:], (out / "sections.log").read_text()[-5000:])
    files = sorted(p.name for p in out.iterdir())
    assert "report.md" in files and len(files) <= 7, files  # the report and at most six files beside it
    for table in ("## Training step", "## Sampling", "## search-and-learn time split", "## Sandbox"):
        assert table in report
