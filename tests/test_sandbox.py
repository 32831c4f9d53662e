"""Model-written programs run in the sandbox pool: each misbehaviour costs that program, never the run."""
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from arc25_fast.data.options import SyntheticConfig
from arc25_fast.data.synthetic import random_program_task
from arc25_fast.runtime.rng import Rng
from arc25_fast.sandbox.pool import Limits, SandboxPool

IMG = [np.array([[1, 2], [3, 4]], dtype=np.uint8)]
GOOD = "def task(img):\n    return img[::-1]"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, limits=Limits(call_seconds=1.0, cpu_seconds=5, memory_bytes=512 << 20)) as p:
        yield p


def run(pool, code, inputs=IMG):
    result = pool.run([(code, inputs)])[0]
    assert pool.run([(GOOD, IMG)])[0].ok  # the pool is unharmed afterwards
    return result


def test_a_correct_program_and_the_synthetic_programs_run(pool):
    result = run(pool, GOOD)
    assert result.ok and result.outputs[0].tolist() == [[3, 4], [1, 2]]
    rng = Rng.for_block(9, 0, 0, 0)
    tasks = [random_program_task(rng, SyntheticConfig()) for _ in range(20)]
    results = pool.run([(t.code, t.inputs) for t in tasks])  # in order, in parallel
    for task, result in zip(tasks, results):
        assert result.ok and all(np.array_equal(a, b) for a, b in zip(result.outputs, task.outputs))


CASES = {
    "syntax error": ("def task(img) return img", "SyntaxError"),
    "no task function": ("x = 1", "defines no function task"),
    "infinite loop": ("def task(img):\n    while True:\n        pass", "TimeoutError"),
    "sleeps": ("import time\ndef task(img):\n    time.sleep(60)", "TimeoutError"),
    "swallows the alarm": ("def task(img):\n    while True:\n        try:\n            while True:\n                pass\n"
                           "        except BaseException:\n            pass", "timed out"),
    "fork bomb": ("import os\ndef task(img):\n    while True:\n        os.fork()", "os.fork is not allowed"),
    "os.system": ("import os\ndef task(img):\n    os.system('touch /tmp/arc25-sandbox-escape')\n    return img",
                  "os.system is not allowed"),
    "subprocess": ("import subprocess\ndef task(img):\n    subprocess.run(['true'])\n    return img", "not allowed"),
    "10 GB allocation": ("import numpy as np\ndef task(img):\n    return np.ones(10 * 2**30, dtype=np.uint8)",
                         "MemoryError"),
    "sys.exit": ("import sys\ndef task(img):\n    sys.exit(0)", "SystemExit"),
    "os._exit": ("import os\ndef task(img):\n    os._exit(0)", "exited without a result"),
    "segfault": ("import faulthandler\ndef task(img):\n    faulthandler._sigsegv()", "crashed (SIGSEGV)"),
    "ctypes": ("import ctypes\ndef task(img):\n    return ctypes.string_at(0)", "not allowed"),
    "write outside scratch": ("def task(img):\n    open('/tmp/arc25-sandbox-escape', 'w').write('x')\n    return img",
                              "writing '/tmp/arc25-sandbox-escape' is not allowed"),
    "delete outside scratch": ("import os\ndef task(img):\n    os.remove('/etc/hostname')", "not allowed"),
    "not a grid": ("def task(img):\n    return [[10, 1]]", "not a grid"),
    "ragged": ("def task(img):\n    return [[1, 2], [3]]", "not a grid"),
    "too large": ("def task(img):\n    return [[0] * 31] * 31", "not a grid"),
    "a string": ("def task(img):\n    return 'hello'", "not a grid"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_misbehaving_program_fails_alone(pool, case):
    code, message = CASES[case]
    before = {p.pid for p in psutil.process_iter()}
    result = run(pool, code)
    assert not result.ok
    assert message in (result.error or "") + " ".join(e or "" for e in result.errors), result
    assert not Path("/tmp/arc25-sandbox-escape").exists() and Path("/etc/hostname").exists()
    time.sleep(0.2)
    leftovers = [p for p in psutil.process_iter() if p.pid not in before and "arc25_fast.sandbox.pool" not in
                 " ".join(p.cmdline() if p.is_running() else [])]
    assert not [p for p in leftovers if p.ppid() in {w.proc.pid for w in pool._workers}], leftovers


def test_megabytes_of_output_cost_nothing(pool):
    result = run(pool, "def task(img):\n    print('x' * 10_000_000)\n    return img")
    assert result.ok and result.outputs[0].tolist() == [[1, 2], [3, 4]]


def test_writing_in_the_scratch_directory_is_allowed(pool):
    code = "def task(img):\n    open('notes.txt', 'w').write('ok')\n    return img\n"
    assert run(pool, code).ok


def test_no_network(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    port = server.getsockname()[1]
    connected = []

    def accept():
        try:
            connected.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    code = f"import socket\ndef task(img):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return img"
    result = run(pool, code)
    thread.join()
    server.close()
    assert not result.ok and "not allowed" in result.errors[0] and not connected


def test_one_failing_input_does_not_hide_the_others(pool):
    code = "def task(img):\n    if img[0, 0] == 9:\n        raise ValueError('nine')\n    return img"
    result = pool.run([(code, [np.array([[1]]), np.array([[9]]), np.array([[2]])])])[0]
    assert [o is None for o in result.outputs] == [False, True, False] and "nine" in result.errors[1]


def test_the_worker_pid_is_not_the_callers(pool):
    code = "import os\ndef task(img):\n    return [[os.getpid() % 10]]"
    result = run(pool, code)
    assert result.ok and os.getpid() not in {w.proc.pid for w in pool._workers}
