"""Scoring: grids parse back from every format, programs whose results are known score as they should, the
ranking rule, voting under augmentations, and Kaggle's submission format."""
import numpy as np
import pytest

from arc25_fast.data.grid_formats import grid_format
from arc25_fast.data.grids import dihedral, random_color_map
from arc25_fast.data.options import SyntheticConfig
from arc25_fast.data.synthetic import random_program_task
from arc25_fast.data.tasks import Task
from arc25_fast.runtime.rng import Rng
from arc25_fast.sandbox.pool import SandboxPool
from arc25_fast.solving.scoring import (
    Candidate,
    extract_code,
    inverse_transform,
    parse_grid,
    rank,
    score_task,
    submission_entry,
)

FORMATS = ["shape+row-numbers+minimal", "minimal", "row-numbers+spaced", "shape+spaced", "spaced"]


@pytest.mark.parametrize("name", FORMATS)
def test_grids_parse_back_from_their_text(name):
    fmt = grid_format(name)
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 7), (30, 30), (12, 1)):
        grid = rng.integers(0, 10, size=(h, w)).astype(np.uint8)
        assert np.array_equal(parse_grid(fmt.to_text(grid), fmt), grid)
        assert np.array_equal(parse_grid("\n " + fmt.to_text(grid) + " \n", fmt), grid)


MALFORMED = ["", "hello", "```grid shape: 2x2\n1 01\n2 0\n```", "```grid shape: 3x2\n1 01\n2 00\n```",
             "```grid shape: 2x2\n1 01\n3 00\n```", "```grid shape: 1x2\n1 0a\n```", "```grid shape: 1x2\n1 01",
             "```grid shape: 31x1\n" + "\n".join(f"{i} 1" for i in range(1, 32)) + "\n```", "```grid shape: x\n```"]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_answers_are_none_never_a_crash(text):
    assert parse_grid(text, grid_format()) is None


def test_code_is_extracted_from_the_answer():
    assert extract_code("```python\ndef task(img):\n    return img\n```") == "def task(img):\n    return img"
    assert extract_code("def task(img):\n    return img\n```\nmore") == "def task(img):\n    return img\n"
    assert extract_code("no program here") is None


def test_inverse_transform_undoes_every_augmentation():
    rng = Rng.for_block(1, 0, 0, 0)
    grid = np.random.default_rng(1).integers(0, 10, size=(3, 5)).astype(np.uint8)
    for k in range(8):
        cmap = random_color_map(rng.np, keep_background=False)
        assert np.array_equal(inverse_transform(cmap[dihedral(grid, k)], k, cmap), grid)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def program_candidates(pool, task: Task, codes: list[str]) -> list[Candidate]:
    inputs = [i for i, _ in task.train] + [i for i, _ in task.test]
    out = []
    for idx, (code, result) in enumerate(zip(codes, pool.run([(c, inputs) for c in codes]))):
        solved = sum(o is not None and np.array_equal(o, y) for o, (_, y) in zip(result.outputs, task.train))
        out.append(Candidate(tuple(result.outputs[len(task.train):]), solved, len(task.train), idx, code))
    return out


def test_synthetic_programs_solve_their_own_tasks_and_wrong_ones_do_not(pool):
    rng = Rng.for_block(4, 0, 0, 0)
    for _ in range(10):
        t = random_program_task(rng, SyntheticConfig(max_inputs=3))
        if len(t.inputs) < 2:
            continue
        task = Task("t", list(zip(t.inputs[:-1], t.outputs[:-1])), [(t.inputs[-1], t.outputs[-1])])
        wrong = "def task(img):\n    return img"
        scores = score_task(task, program_candidates(pool, task, [t.code]))
        assert scores["pass@1"] == 1.0 and scores["train_correct"] == 1 and scores["arc_score"] == 1.0
        if not all(np.array_equal(i, o) for i, o in zip(t.inputs, t.outputs)):
            assert score_task(task, program_candidates(pool, task, [wrong]))["pass@2"] == 0.0


def test_ranking_prefers_train_correct_then_votes():
    truth = np.array([[1]], dtype=np.uint8)
    wrong = np.array([[2]], dtype=np.uint8)
    task = Task("t", [(np.array([[0]]), np.array([[0]]))], [(np.array([[0]]), truth)])
    candidates = [Candidate((wrong,), 0, 1, 0), Candidate((wrong,), 0, 1, 1), Candidate((wrong,), 0, 1, 2),
                  Candidate((truth,), 1, 1, 3), Candidate((None,), 1, 1, 4)]
    ranked = rank(candidates)
    assert [g.votes for g in ranked] == [1, 3] and ranked[0].train_correct  # one train-correct beats three votes
    scores = score_task(task, candidates)
    assert scores["pass@1"] == 1.0 and scores["groups"] == 2
    votes = [Candidate((wrong,), index=0), Candidate((truth,), index=1), Candidate((truth,), index=2)]
    assert score_task(task, votes)["pass@1"] == 1.0  # output tasks: the majority wins
    assert score_task(task, votes[:2])["pass@1"] == 0.0 and score_task(task, votes[:2])["pass@2"] == 1.0  # tie: first


def test_unknown_test_outputs_give_attempts_and_a_kaggle_entry():
    task = Task("t", [(np.array([[0]]), np.array([[0]]))], [(np.array([[0]]), None), (np.array([[1]]), None)])
    grid = np.array([[3, 4]], dtype=np.uint8)
    scores = score_task(task, [Candidate((grid, grid), index=0)])
    assert "pass@1" not in scores and [len(a) for a in scores["attempts"]] == [1, 1]
    entry = submission_entry(task, scores["attempts"])
    assert entry == [{"attempt_1": [[3, 4]], "attempt_2": [[0]]}, {"attempt_1": [[3, 4]], "attempt_2": [[0]]}]


def test_augmentation_scores_rank_before_votes_and_ties_keep_the_order():
    a, b, c = (np.full((2, 2), v, dtype=np.uint8) for v in (1, 2, 3))
    candidates = [Candidate((a,), index=0, score=-5.0), Candidate((a,), index=1, score=-5.0),
                  Candidate((b,), index=2, score=-1.0), Candidate((c,), index=3, score=-1.0)]
    order = [g.test_outputs[0][0, 0] for g in rank(candidates)]
    assert order == [2, 3, 1]  # b and c tie on score: the first sampled first; a's two votes come after
    assert [g.test_outputs[0][0, 0] for g in rank([Candidate(x.test_outputs, index=x.index) for x in candidates])] \
        == [1, 2, 3]  # without scores: votes
