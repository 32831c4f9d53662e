from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from arc25_fast.cli import main
from arc25_fast.data.tokenizer import load_tokenizer

QWEN2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen2-tokenizer"


def invoke(args: list[str]):
    """``arc25-fast ARGS`` in this process; it must succeed (its output, and any exception, shown when not)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    if not QWEN2_TOKENIZER.is_dir():
        pytest.skip(f"real Qwen2 tokenizer fixture not found at {QWEN2_TOKENIZER} (../shared is absent)")
    return load_tokenizer(str(QWEN2_TOKENIZER))


@pytest.fixture
def busy_core(capsys):
    """Another process keeping a core busy, checked to make the trainer print its note about threads (the line a
    one-line error must not be preceded by)."""
    import subprocess
    import sys
    import time

    from arc25_fast.runtime.threads import set_threads

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        set_threads(0, 0)
        assert "cores are busy with other processes" in capsys.readouterr().err
        yield busy
    finally:
        busy.kill()
        busy.wait()


@pytest.fixture(scope="session")
def default_mix():
    from arc25_fast.data.sources import default_mix

    return default_mix()


def pytest_sessionfinish(session, exitstatus):
    """A process left behind by a test fails the run and is killed here: one that ignores SIGTERM (a data worker)
    would otherwise keep the interpreter, and CI, from ever exiting after the summary."""
    children = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    _, left = psutil.wait_procs(children, timeout=5)
    for p in left:
        try:
            print(f"\nleft behind by a test: pid {p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if left:
        session.exitstatus = 1
