"""Running model-written programs safely: never in the trainer's or evaluator's interpreter.

A ``SandboxPool`` keeps N worker processes (``python -m arc25_fast.sandbox``, a clean interpreter with NumPy and the
drawing DSL). For each program a worker forks a child that runs it on every input, and dies after:

- its own session (the worker kills the whole process group afterwards: nothing it started survives);
- limits: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``, so a 10 GB allocation is a ``MemoryError``),
  file size, open files, processes (``RLIMIT_NPROC``; root is exempt, see the next point), no core dumps;
- an audit hook that refuses process creation (fork, exec, spawn, ``os.system``, ``subprocess``), sockets,
  ``ctypes``, signals to other processes, and any write, rename or delete outside its scratch directory;
- no network namespace when the kernel allows one (``unshare(CLONE_NEWNET)``), on top of the socket ban;
- stdin, stdout and stderr on ``/dev/null`` (megabytes of prints cost nothing); a per-call wall-clock alarm, and
  the worker's own deadline for the whole program, after which the process group is killed.

The child reports JSON (never pickle), validated again by the worker: every output must be a list of lists of
ints 0-9, rectangular, at most 30x30. An infinite loop, a fork bomb, ``os.system``, a huge allocation,
``sys.exit``, ``os._exit``, a segfault or a flood of output each cost one failed program, never the run.
"""
import ctypes
import json
import os
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_SIDE = 30
MAX_REPORT_BYTES = 1 << 20
BLOCKED_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                  "os.kill", "os.killpg", "pty.spawn", "os.setuid", "os.setgid", "os.putenv", "os.unsetenv",
                  "resource.setrlimit", "sys.addaudithook", "os.startfile", "webbrowser.open"}
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes", "urllib.", "http.", "ftplib.", "smtplib.", "telnetlib.",
                    "poplib.", "imaplib.", "nntplib.")
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.symlink",
               "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags", "os.lchown"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@dataclass(frozen=True)
class Limits:
    call_seconds: float = 2.0  # wall clock per call of task(img)
    cpu_seconds: int = 10  # CPU time of the whole program (all calls)
    memory_bytes: int = 1 << 30  # address space beyond what the worker already maps
    file_bytes: int = 1 << 20
    processes: int = 64


@dataclass
class RunResult:
    """What one program did on its inputs: an output grid (or None) and an error (or None) per input, or an error
    for the whole program (did not compile, crashed, timed out, ...)."""

    outputs: list[np.ndarray | None]
    errors: list[str | None]
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(o is not None for o in self.outputs)


def valid_grid(value) -> list[list[int]] | None:
    """The value as a list of rows of ints 0-9 if it is a grid (rectangular, 1..30 per side), else None."""
    if isinstance(value, np.ndarray):
        if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
            return None
        value = value.tolist()
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_SIDE:
        return None
    rows = []
    for row in value:
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, list | tuple) or not 1 <= len(row) <= MAX_SIDE or len(row) != len(value[0]):
            return None
        cells = []
        for cell in row:
            if isinstance(cell, np.integer):
                cell = int(cell)
            if type(cell) is not int or not 0 <= cell <= 9:
                return None
            cells.append(cell)
        rows.append(cells)
    return rows


# ---- the child: one program, then exit -------------------------------------------------------------------------

def _audit(scratch: str):
    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(scratch + os.sep)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args) -> None:
        if event in BLOCKED_EVENTS or event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed")
        elif event in PATH_EVENTS and not all(inside(a) for a in args[:2] if isinstance(a, str | bytes | os.PathLike)):
            raise PermissionError(f"sandbox: {event} outside the scratch directory is not allowed")
    return hook


def _no_network() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET (root); else try a user namespace as well
            libc.unshare(0x10000000 | 0x40000000)
    except (OSError, AttributeError):
        pass


def _run_child(code: str, inputs: list, limits: Limits, scratch: str, report_fd: int) -> None:
    """In the forked child: limit, isolate, run, report, exit. Never returns."""
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        mapped = _mapped_bytes()
        for limit, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, mapped +
                             limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                             (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NOFILE, 64)):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass
        os.chdir(scratch)
        _no_network()
        from .synthetic import DSL

        namespace = {"__name__": "__program__", "np": np, "numpy": np, **DSL}
        outputs, errors, error = [], [], None

        def alarm(signum, frame):
            raise TimeoutError(f"call took more than {limits.call_seconds:g} s")

        signal.signal(signal.SIGALRM, alarm)
        sys.addaudithook(_audit(scratch))
        try:
            exec(compile(code, "<program>", "exec"), namespace)
            task = namespace.get("task")
            if not callable(task):
                raise NameError("the program defines no function task(img)")
        except BaseException as e:  # noqa: BLE001 - anything the program does is its own failure
            error, task = f"{type(e).__name__}: {e}"[:300], None
        for grid in inputs if task is not None else []:
            try:
                signal.setitimer(signal.ITIMER_REAL, limits.call_seconds)
                result = task(np.array(grid, dtype=np.uint8))
                signal.setitimer(signal.ITIMER_REAL, 0)
                checked = valid_grid(result)
                outputs.append(checked)
                errors.append(None if checked is not None else "the output is not a grid of ints 0-9, at most 30x30")
            except BaseException as e:  # noqa: BLE001
                signal.setitimer(signal.ITIMER_REAL, 0)
                outputs.append(None)
                errors.append(f"{type(e).__name__}: {e}"[:300])
        report = json.dumps({"outputs": outputs, "errors": errors, "error": error}).encode()
        os.write(report_fd, report[:MAX_REPORT_BYTES])
    finally:
        os._exit(0)


def _mapped_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(code: str, inputs: list, limits: Limits) -> dict:
    """Fork a child for one program and collect its report (in a worker process)."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryDirectory(prefix="arc25-sandbox-") as scratch:
        scratch = os.path.realpath(scratch)
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _run_child(code, inputs, limits, scratch, write_fd)
        os.close(write_fd)
        deadline = time.monotonic() + limits.call_seconds * max(len(inputs), 1) + 2.0
        chunks, size, timed_out = [], 0, False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size <= MAX_REPORT_BYTES:
                chunks.append(chunk)
        os.close(read_fd)
        try:
            os.killpg(pid, signal.SIGKILL)  # the child and anything it managed to start
        except (ProcessLookupError, PermissionError):
            pass
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"error": f"timed out ({limits.call_seconds:g} s per call, {len(inputs)} call(s))"}
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL and not chunks:
        return {"error": f"crashed ({signal.Signals(os.WTERMSIG(status)).name})"}
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"error": "exited without a result"}


def _serve() -> None:
    """Worker loop: length-prefixed JSON jobs on stdin, length-prefixed JSON results on stdout."""
    from .synthetic import DSL

    for name, fn in DSL.items():  # compile (or load) the numba DSL here: children may not use ctypes, which numba does
        img = np.zeros((3, 3), dtype=np.uint8)
        if name in ("draw_line", "draw_rectangle"):
            fn(img, (0, 0), (1, 1), 1)
        elif name == "draw_pixel":
            fn(img, (0, 0), 1)
        else:
            fn(img, 1, 1)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        job = json.loads(stdin.read(struct.unpack("<I", header)[0]))
        result = run_one(job["code"], job["inputs"], Limits(**job["limits"]))
        payload = json.dumps(result).encode()
        stdout.write(struct.pack("<I", len(payload)) + payload)
        stdout.flush()


# ---- the pool, in the evaluator or trainer -------------------------------------------------------------------

def _checked(report: dict, n_inputs: int) -> RunResult:
    """The worker's report turned into grids, trusting nothing in it."""
    if report.get("error") or not isinstance(report.get("outputs"), list):
        return RunResult([None] * n_inputs, [None] * n_inputs, str(report.get("error") or "no outputs")[:300])
    outputs = [valid_grid(o) for o in report["outputs"][:n_inputs]]
    outputs += [None] * (n_inputs - len(outputs))
    errors = [str(e)[:300] if e else None for e in (report.get("errors") or [])][:n_inputs]
    errors += [None] * (n_inputs - len(errors))
    errors = [e or ("the output is not a grid" if o is None else None) for o, e in zip(outputs, errors)]
    return RunResult([np.array(o, dtype=np.uint8) if o is not None else None for o in outputs], errors)


@dataclass
class _Worker:
    proc: subprocess.Popen
    lock: threading.Lock = field(default_factory=threading.Lock)


class SandboxPool:
    """N sandbox workers; ``run`` executes many programs in parallel and returns their results in order."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits()):
        self.limits = limits
        self.size = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
        self._workers = [self._start() for _ in range(self.size)]
        self._free: queue.Queue = queue.Queue()
        for w in self._workers:
            self._free.put(w)

    @staticmethod
    def _start() -> _Worker:
        proc = subprocess.Popen([sys.executable, "-m", "arc25_fast.sandbox"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return _Worker(proc)

    def _ask(self, worker: _Worker, job: dict) -> dict:
        payload = json.dumps(job).encode()
        worker.proc.stdin.write(struct.pack("<I", len(payload)) + payload)
        worker.proc.stdin.flush()
        header = worker.proc.stdout.read(4)
        if len(header) < 4:
            raise OSError("sandbox worker died")
        return json.loads(worker.proc.stdout.read(struct.unpack("<I", header)[0]))

    def _one(self, code: str, inputs: list[np.ndarray]) -> RunResult:
        job = {"code": code, "inputs": [np.asarray(g).tolist() for g in inputs],
               "limits": self.limits.__dict__}
        worker = self._free.get()
        start = time.perf_counter()
        try:
            report = self._ask(worker, job)
        except (OSError, ValueError, json.JSONDecodeError):  # the worker itself died: replace it
            worker.proc.kill()
            self._workers.remove(worker)
            worker = self._start()
            self._workers.append(worker)
            report = {"error": "sandbox worker died"}
        finally:
            self._free.put(worker)
        result = _checked(report, len(inputs))
        result.seconds = time.perf_counter() - start
        return result

    def run(self, programs: list[tuple[str, list[np.ndarray]]]) -> list[RunResult]:
        if not programs:
            return []
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.size) as threads:
            return list(threads.map(lambda p: self._one(*p), programs))

    def close(self) -> None:
        for w in self._workers:
            try:
                w.proc.stdin.close()
                w.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                w.proc.kill()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _serve()
