"""Synthetic drawing programs: the rendered code does exactly what produced the outputs, and every call matters."""
import numpy as np

from arc25_fast.rng import Rng
from arc25_fast.synthetic import DSL, SyntheticConfig, draw_line, random_program_task, run_code


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
