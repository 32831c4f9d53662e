"""Going on from a partial program: which programs are partial, what they leave to do, how two programs are joined,
and the samples that go on from one (real sandbox, real encoder, answers served by the replay generator)."""
import numpy as np
import pytest

from arc25_fast.data.options import DataOptions
from arc25_fast.data.pipeline import build_encoder
from arc25_fast.data.synthetic import run_code
from arc25_fast.data.tasks import Task
from arc25_fast.sandbox.pool import SandboxPool
from arc25_fast.solving.generation import ReplayGenerator
from arc25_fast.solving.options import Sampling
from arc25_fast.solving.refine import best_partial, color_tasks, join, progress, rest_task
from arc25_fast.solving.solver import code_prompt, sample_programs

LINE = "def task(img):\n    draw_line(img, point1=(0, 0), point2=(0, 3), color=4)\n    return img"
RECT = "def task(img):\n    draw_rectangle(img, point1=(1, 1), point2=(2, 2), color=2)\n    return img"
PIXEL = "def task(img):\n    draw_pixel(img, point=(1, 1), color=7)\n    return img"  # on top of the rectangle
HALF = "def task(img):\n    draw_line(img, point1=(2, 1), point2=(2, 2), color=2)\n    return img"  # its lower half
BOTH = "def task(img):\n    draw_rectangle(img, point1=(1, 1), point2=(2, 2), color=2)\n" \
       "    draw_pixel(img, point=(1, 1), color=7)\n    return img"


def two_call_task() -> Task:
    """A rectangle with a pixel drawn on it, on canvases of different sizes and backgrounds."""
    inputs = [np.full(shape, bg, dtype=np.uint8) for shape, bg in (((4, 5), 0), ((5, 4), 3), ((6, 6), 8), ((4, 4), 1))]
    outputs = run_code(BOTH, inputs)
    return Task("two", list(zip(inputs[:3], outputs[:3])), [(inputs[3], outputs[3])])


def outputs_of(code: str, task: Task) -> list[np.ndarray]:
    return run_code(code, [x for x, _ in task.train] + [x for x, _ in task.test])


def test_a_partial_program_draws_part_of_every_output_and_nothing_wrong():
    task = two_call_task()
    assert progress(outputs_of(PIXEL, task), task) == pytest.approx(0.25)  # 1 of the 4 cells that change
    assert progress(outputs_of(HALF, task), task) == pytest.approx(0.5)
    assert progress(outputs_of(RECT, task), task) is None                  # its cell under the 7 is wrong
    assert progress(outputs_of(BOTH, task), task) is None                  # it solves the task: nothing is left
    assert progress(outputs_of(LINE, task), task) is None                  # it draws cells that stay as they were
    assert progress(outputs_of("def task(img):\n    return img", task), task) is None
    wrong_pixel = PIXEL.replace("color=7", "color=5")
    assert progress(outputs_of(wrong_pixel, task), task) is None


def test_the_partial_that_draws_most_is_chosen_the_earliest_among_equals():
    task = two_call_task()
    lines = [{"code": c, "outputs": [o.tolist() for o in outputs_of(c, task)]} for c in (LINE, PIXEL, HALF, HALF + " ")]
    assert best_partial(task, lines)["code"] == HALF
    assert best_partial(task, lines[:1]) is None


def test_what_is_left_is_the_outputs_with_the_partial_changes_taken_out():
    task = two_call_task()
    rest = rest_task(task, outputs_of(PIXEL, task))
    for (x, y), (rx, ry) in zip(task.train, rest.train):
        assert rx is x
        assert ry[1, 1] == x[1, 1] and (ry == run_code(RECT, [x])[0]).sum() == ry.size - 1  # the rectangle, a hole
    assert rest.test == task.test


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def test_a_program_joined_before_a_partial_one_runs_as_both_in_turn(pool):
    task = two_call_task()
    joined = join(RECT, PIXEL)
    assert joined.count("def task") == 1 and joined.index("draw_rectangle") < joined.index("draw_pixel")
    assert all(np.array_equal(a, b) for a, b in zip(outputs_of(joined, task), outputs_of(BOTH, task)))
    # a program that builds a new grid with a helper: each kept whole in a scope of its own, helpers apart
    helper = ("import numpy as np\ndef paint(g):\n    '''a docstring\n    over two lines'''\n    return g * 0 + 5\n"
              "def task(grid):\n    out = np.array(grid)\n    return paint(out)")
    other = "def paint(g):\n    return g\ndef task(img):\n    img[0, 0] = paint(1)\n    return img"
    ran = pool.run([(join(helper, other), [np.zeros((2, 3), dtype=np.uint8)])])[0]  # as the sandbox runs programs
    assert ran.ok and ran.outputs[0].tolist() == [[1, 5, 5], [5, 5, 5]]
    assert join("def task(img):\n    return img +", PIXEL) is None
    assert join("def solve(img):\n    return img", PIXEL) is None
    assert join("from numpy import *\ndef task(img):\n    return img", PIXEL) is None  # not allowed in a scope


def test_rest_samples_go_on_from_the_best_partial_program(tiny_tokenizer, pool):
    task = two_call_task()
    encoder = build_encoder(tiny_tokenizer, DataOptions())
    rest_prompt = code_prompt(rest_task(task, outputs_of(PIXEL, task)), encoder)
    answers = {tuple(code_prompt(task, encoder)): [f"```python\n{c}\n```" for c in (LINE, PIXEL)],
               tuple(rest_prompt): [f"```python\n{c}\n```" for c in (LINE, RECT)]}
    ran = sample_programs(task, encoder, ReplayGenerator(answers), Sampling(n=4, rest_samples=2), pool)
    assert [c.index for c in ran.candidates] == [0, 1, 2, 3]
    assert [c.train_correct for c in ran.candidates] == [False, False, False, True]
    assert ran.candidates[3].code == join(RECT, PIXEL) and ran.candidates[3].test_outputs[0].tolist() == \
        task.test[0][1].tolist()
    assert [r.get("runs_before") for r in ran.records] == [None, None, PIXEL, PIXEL]
    # known partials (earlier rounds') count too; none at all: the rest is sampled from the task's own prompt
    known = [{"code": HALF, "outputs": [o.tolist() for o in outputs_of(HALF, task)]}]
    answers[tuple(code_prompt(rest_task(task, outputs_of(HALF, task)), encoder))] = [f"```python\n{BOTH}\n```"]
    ran = sample_programs(task, encoder, ReplayGenerator(answers), Sampling(n=4, rest_samples=2), pool, known=known)
    assert ran.records[-1]["runs_before"] == HALF and ran.candidates[-1].train_correct
    answers[tuple(code_prompt(task, encoder))] = [f"```python\n{LINE}\n```"]
    ran = sample_programs(task, encoder, ReplayGenerator(answers), Sampling(n=2, rest_samples=1), pool)
    assert len(ran.records) == 2 and "runs_before" not in ran.records[1]


def test_rest_steps_go_on_from_the_joined_programs_of_the_steps_before(tiny_tokenizer, pool):
    task = two_call_task()
    encoder = build_encoder(tiny_tokenizer, DataOptions())
    halfway = join(HALF, PIXEL)  # what step 1 should give: the lower half and the pixel, 3 cells of 4
    answers = {tuple(code_prompt(task, encoder)): [f"```python\n{PIXEL}\n```"],
               tuple(code_prompt(rest_task(task, outputs_of(PIXEL, task)), encoder)): [f"```python\n{HALF}\n```"],
               tuple(code_prompt(rest_task(task, outputs_of(halfway, task)), encoder)): [f"```python\n{RECT}\n```"]}
    ran = sample_programs(task, encoder, ReplayGenerator(answers), Sampling(n=3, rest_samples=2, rest_steps=2), pool)
    assert [r.get("runs_before") for r in ran.records] == [None, PIXEL, halfway]
    assert [c.train_correct for c in ran.candidates] == [False, False, True]
    assert ran.candidates[2].code.count("draw_") == 3


def test_a_task_split_by_colour_keeps_one_colours_changes_in_each_part():
    task = two_call_task()
    (rect_color, rect_part), (pixel_color, pixel_part) = color_tasks(task)  # the rectangle's 3 visible cells first
    assert (rect_color, pixel_color) == (2, 7)
    for (x, y), (rx, ry), (px, py) in zip(task.train, rect_part.train, pixel_part.train):
        assert rx is x and px is x
        assert (ry == 2).sum() == 3 and ry[1, 1] == x[1, 1] and ((ry == 2) | (ry == x)).all()
        assert np.array_equal(py, run_code(PIXEL, [x])[0])
    assert pixel_part.test == task.test
    one_colour = Task("one", [(x, run_code(RECT, [x])[0]) for x, _ in task.train], task.test)
    assert color_tasks(one_colour) == []
    reshaped = Task("shape", [(x, y[:-1]) for x, y in task.train], task.test)
    assert color_tasks(reshaped) == []


def test_split_colors_writes_the_first_programs_for_each_colour_then_goes_on_from_them(tiny_tokenizer, pool):
    task = two_call_task()
    encoder = build_encoder(tiny_tokenizer, DataOptions())
    (_, rect_part), (_, pixel_part) = color_tasks(task)
    answers = {tuple(code_prompt(rect_part, encoder)): [f"```python\n{LINE}\n```"],
               tuple(code_prompt(pixel_part, encoder)): [f"```python\n{PIXEL}\n```"],
               tuple(code_prompt(rest_task(task, outputs_of(PIXEL, task)), encoder)): [f"```python\n{RECT}\n```"]}
    # the task's own prompt has no answers here: the replay generator would fail if it were asked for one
    ran = sample_programs(task, encoder, ReplayGenerator(answers),
                          Sampling(n=3, rest_samples=1, split_colors=True), pool)
    assert [r.get("runs_before") for r in ran.records] == [None, None, PIXEL]
    assert [r.get("written_for_color") for r in ran.records] == [2, 7, None]
    assert [c.train_correct for c in ran.candidates] == [False, False, True]
    # without --split-colors the first programs come from the task's own prompt
    with pytest.raises(KeyError):
        sample_programs(task, encoder, ReplayGenerator(answers), Sampling(n=3, rest_samples=1), pool)
