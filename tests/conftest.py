from pathlib import Path

import pytest

from arc25_fast.tokenizer import load_tokenizer

QWEN2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen2-tokenizer"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip(f"real Qwen2 tokenizer fixture not found at {QWEN2_TOKENIZER} (../shared is absent)")
    return load_tokenizer(str(QWEN2_TOKENIZER))


@pytest.fixture(scope="session")
def default_mix():
    from arc25_fast.sources import default_mix

    return default_mix()
