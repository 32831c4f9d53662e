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


@dataclass
class Sample:
    """One training sample before encoding; ``source`` and ``task_id`` say where it came from."""

    source: str
    task_id: str
    user: list[Segment]
    answer: list[Segment]


def _examples(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[Segment]:
    out: list[Segment] = []
    for i, (inp, outp) in enumerate(pairs, start=1):
        out += [f"\n## Example {i}\n\n### Input\n\n", inp, "\n\n### Output\n\n", outp, "\n"]
    return out


def output_from_examples(source: str, task_id: str, examples: list[tuple[np.ndarray, np.ndarray]],
                         test_input: np.ndarray, test_output: np.ndarray) -> Sample:
    user = [OUTPUT_FROM_EXAMPLES, *_examples(examples), "\n## Test\n\n### Input\n\n", test_input, "\n"]
    return Sample(source, task_id, user, [test_output])


def code_from_examples(source: str, task_id: str, inputs: list[np.ndarray], outputs: list[np.ndarray],
                       code: str) -> Sample:
    user = [CODE_FROM_EXAMPLES, *_examples(list(zip(inputs, outputs)))]
    return Sample(source, task_id, user, [f"```python\n{code}\n```"])
