"""Synthetic drawing programs: the rendered code does exactly what produced the outputs, and every call matters."""
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from arc25_fast.data.options import SyntheticConfig
from arc25_fast.data.sources import load_mix
from arc25_fast.data.synthetic import DSL, draw_line, random_program_task, run_code
from arc25_fast.runtime.rng import Rng

ROOT = Path(__file__).resolve().parents[1]


def test_rendered_code_reproduces_outputs_and_no_call_is_dead():
    rng = Rng.for_block(3, 0, 0, 0)
    cfg = SyntheticConfig(max_calls=6)
    for _ in range(200):
        task = random_program_task(rng, cfg)
        assert 1 <= len(task.inputs) <= cfg.max_inputs
        assert all(cfg.min_side <= s <= cfg.max_side for img in task.inputs for s in img.shape)
        outputs = run_code(task.code, task.inputs)
        assert all(np.array_equal(a, b) for a, b in zip(outputs, task.outputs))
        lines = task.code.splitlines()
        calls = [i for i, line in enumerate(lines) if line.strip().startswith("draw_")]
        assert 1 <= len(calls) <= cfg.max_calls
        assert all(lines[i].split("(")[0].strip() in DSL for i in calls)
        for i in calls:  # removing any call changes some output
            without = "\n".join(line for j, line in enumerate(lines) if j != i)
            assert any(not np.array_equal(a, b) for a, b in zip(run_code(without, task.inputs), task.outputs))


def test_draw_line_is_continuous_and_clipped():
    img = np.zeros((5, 5), dtype=np.uint8)
    draw_line(img, (0, 0), (4, 2), 3)
    assert img.sum() == 3 * 5 and img[0, 0] == 3 and img[4, 2] == 3
    img = np.zeros((3, 3), dtype=np.uint8)
    draw_line(img, (-2, 1), (5, 1), 1)
    assert img[:, 1].tolist() == [1, 1, 1] and img.sum() == 3


def test_same_seed_same_tasks():
    a = [random_program_task(Rng.for_block(1, 2, 3, 4), SyntheticConfig()).code for _ in range(3)]
    b = [random_program_task(Rng.for_block(1, 2, 3, 4), SyntheticConfig()).code for _ in range(3)]
    assert a == b


def test_distinct_colors_keep_every_call_visible_on_one_colour_inputs():
    cfg = SyntheticConfig(max_calls=2, noise=0.0, background=-1, distinct_colors=True, max_side=12)
    rng = Rng.for_block(3, 1, 4, 1)
    for _ in range(200):
        task = random_program_task(rng, cfg)
        backgrounds = {int(img[0, 0]) for img in task.inputs}
        drawn = {int(c) for c in re.findall(r"color=(\d)", task.code)}
        assert not backgrounds & drawn, (task.code, backgrounds)


def test_drawn_calls_are_on_every_input_and_the_program_draws_on_top():
    cfg = SyntheticConfig(max_calls=1, noise=0.0, background=-1, distinct_colors=True, max_side=8, drawn_calls=2)
    rng = Rng.for_block(3, 1, 4, 2)
    for _ in range(100):
        task = random_program_task(rng, cfg)
        assert all(img.min() < img.max() for img in task.inputs)  # each input carries what was drawn before
        assert all(np.array_equal(a, b) for a, b in zip(run_code(task.code, task.inputs), task.outputs))
        assert task.code.count("draw_") == 1


def test_the_independent_varied_set_is_what_its_programs_draw(tmp_path):
    """benchmarks/varied_tasks.py paints with its own code; the DSL must draw exactly the same outputs, and every
    example has its own background, never the drawn colour."""
    out = tmp_path / "varied_challenges.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "varied_tasks.py"), "--out", str(out), "--calls", "2",
                    "--count", "40"], check=True, capture_output=True)
    challenges = json.loads(out.read_text())
    solutions = json.loads((tmp_path / "varied_solutions.json").read_text())
    programs = json.loads((tmp_path / "varied_programs.json").read_text())
    assert len(challenges) == 40
    for task_id, task in challenges.items():
        inputs = [np.array(p["input"], dtype=np.uint8) for p in task["train"]]
        inputs.append(np.array(task["test"][0]["input"], dtype=np.uint8))
        outputs = [np.array(p["output"]) for p in task["train"]] + [np.array(solutions[task_id][0])]
        assert all(np.array_equal(a, b) for a, b in zip(run_code(programs[task_id], inputs), outputs)), task_id
        drawn = {int(c) for c in re.findall(r"color=(\d)", programs[task_id])}
        assert not {int(g[0, 0]) for g in inputs} & drawn


def test_one_mix_holds_several_kinds_of_synthetic_task():
    base = SyntheticConfig(max_side=12, noise=0.0, background=-1, distinct_colors=True)
    mix = load_mix(["synthetic@3", "synthetic:background=0,max_side=6,distinct_colors=false@1"], synthetic=base)
    varied, black = mix.sources
    assert varied.config == base and mix.weights == [3.0, 1.0]
    assert black.config == replace(base, background=0, max_side=6, distinct_colors=False)
    assert black.name == "synthetic:background=0,max_side=6,distinct_colors=false"
    rng = Rng.for_block(0, 0, 0, 0)
    for _ in range(20):
        task = random_program_task(rng, black.config)
        assert all(max(x.shape) <= 6 and (x == 0).all() for x in task.inputs)
    for spec, message in (("synthetic:bg=0", "unknown key 'bg'"), ("synthetic:max_side=40", "max_side: must be at most 30"),
                          ("synthetic:min_side=9,max_side=6", "is more than"), ("synthetic:max_side", "KEY=VALUE")):
        with pytest.raises(ValueError, match=message) as caught:
            load_mix([spec], synthetic=base)
        assert spec in str(caught.value)
