"""Prompts: a training sample is a user message and an answer, each a list of text pieces and grids.

Keeping grids as arrays (not text) lets the fast encoder write them as token ids directly, while the
reference path renders the very same pieces to text.
"""
from dataclasses import dataclass

import numpy as np

Segment = str | np.ndarray

OUTPUT_FROM_EXAMPLES = (
    "Find the rule that turns each input grid into its output grid in the examples, "
    "then apply it to the test input and answer with the test output grid.\n"
)
CODE_FROM_EXAMPLES = (
    "Write a Python function `task(img)` that turns each input grid into its output grid. "
    "Answer with the code only.\n"
)


OUTPUT, CODE = "output-from-examples", "code-from-examples"


@dataclass
class Sample:
    """One training sample before encoding; ``source`` and ``task_id`` say where it came from.

    ``demo_outputs`` are the indices in ``user`` of the demo output grids, in order (``--train-on`` can train them);
    ``answer`` is empty for a prompt to generate from.
    """

    source: str
    task_id: str
    user: list[Segment]
    answer: list[Segment]
    kind: str = OUTPUT
    demo_outputs: tuple[int, ...] = ()


def _examples(pairs: list[tuple[np.ndarray, np.ndarray]], head: list[Segment]) -> tuple[list[Segment], tuple[int, ...]]:
    out: list[Segment] = list(head)
    outputs = []
    for i, (inp, outp) in enumerate(pairs, start=1):
        out += [f"\n## Example {i}\n\n### Input\n\n", inp, "\n\n### Output\n\n"]
        outputs.append(len(out))
        out += [outp, "\n"]
    return out, tuple(outputs)


def output_from_examples(source: str, task_id: str, examples: list[tuple[np.ndarray, np.ndarray]],
                         test_input: np.ndarray, test_output: np.ndarray | None) -> Sample:
    """The model answers with the test output grid (``test_output`` None: a prompt to generate from)."""
    user, outputs = _examples(examples, [OUTPUT_FROM_EXAMPLES])
    user += ["\n## Test\n\n### Input\n\n", test_input, "\n"]
    return Sample(source, task_id, user, [] if test_output is None else [test_output], OUTPUT, outputs)


def code_from_examples(source: str, task_id: str, inputs: list[np.ndarray], outputs: list[np.ndarray],
                       code: str | None) -> Sample:
    """The model answers with a program (``code`` None: a prompt to generate from)."""
    user, demo_outputs = _examples(list(zip(inputs, outputs)), [CODE_FROM_EXAMPLES])
    return Sample(source, task_id, user, [] if code is None else [code_answer(code)], CODE, demo_outputs)


def code_answer(code: str) -> str:
    return f"```python\n{code}\n```"
