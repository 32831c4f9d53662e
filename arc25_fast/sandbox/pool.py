"""Running model-written programs: never in the trainer's or evaluator's interpreter, and never trusted.

A ``SandboxPool`` keeps N worker processes (``python -m arc25_fast.sandbox.pool``), each in the isolation that
``isolation`` sets up (bubblewrap namespaces with a minimal read-only file view, a clean environment). A worker has
NumPy and the drawing DSL loaded; for each program it forks a child that confines itself further (Landlock,
seccomp, limits, an audit hook as a tripwire), runs the program on every input, reports JSON on a pipe and is
killed. The worker is not dumpable and the child holds none of its descriptors, so the job channel is out of reach.

The pool trusts nothing it reads: every reply has a length cap and a deadline and is validated strictly; a worker
that stalls, dies or breaks the protocol is killed and replaced, and only the program in flight fails. Outputs must
be lists of lists of ints 0-9, rectangular, at most 30x30.
"""
import json
import os
import queue
import resource
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.synthetic import DSL
from .isolation import (
    SCRATCH,
    Layers,
    bwrap_command,
    landlock_enforce,
    landlock_ruleset,
    readable_dirs,
    resolve,
    seccomp_filter,
    seccomp_load,
    worker_env,
)
from .options import SandboxOptions

MAX_SIDE = 30
MAX_REPORT_BYTES = 1 << 20
MAX_ERROR = 300
READY_SECONDS = 60.0  # a worker's start (imports, compiling the DSL) on a busy machine
REPLY_MARGIN = 5.0  # seconds a worker may take beyond its program's own deadline
BLOCKED_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                  "os.kill", "os.killpg", "pty.spawn", "os.setuid", "os.setgid", "os.putenv", "os.unsetenv",
                  "resource.setrlimit", "sys.addaudithook", "os.startfile", "webbrowser.open"}
BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes", "urllib.", "http.", "ftplib.", "smtplib.", "telnetlib.",
                    "poplib.", "imaplib.", "nntplib.")
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.symlink",
               "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags", "os.lchown"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PRELOADED = ("math", "cmath", "itertools", "collections", "functools", "operator", "heapq", "bisect", "random",
             "copy", "re", "string", "typing", "dataclasses", "statistics", "fractions", "decimal", "array",
             "numpy.linalg", "numpy.fft", "numpy.random")  # loaded by the worker: a program's imports cost nothing


@dataclass(frozen=True)
class Limits:
    call_seconds: float = 2.0  # wall clock per call of task(img)
    cpu_seconds: int = 10  # CPU time of the whole program (all calls)
    memory_bytes: int = 1 << 30  # address space beyond what the worker already maps
    file_bytes: int = 1 << 20  # largest file a program may write
    scratch_bytes: int = 64 << 20  # its scratch directory, in all (a tmpfs under the namespaces layer)
    processes: int = 64

    def program_seconds(self, n_inputs: int) -> float:
        """The wall clock a whole program gets (every call, plus start-up) before its worker kills it."""
        return self.call_seconds * max(n_inputs, 1) + 2.0


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


class ProtocolError(ValueError):
    """A report or reply that is not what the protocol allows."""


def checked_report(report, n_inputs: int) -> dict:
    """A report reduced to exactly what the protocol allows, or ``ProtocolError``: a dict with ``outputs`` (one grid
    or None per input), ``errors`` (one short string or None per input) and ``error`` (None or a short string)."""
    if not isinstance(report, dict) or not set(report) <= {"outputs", "errors", "error", "retire"}:
        raise ProtocolError("the report is not a dict of outputs, errors and error")
    error = report.get("error")
    if error is not None and not isinstance(error, str):
        raise ProtocolError("error is not a string")
    if not isinstance(report.get("retire", False), bool):
        raise ProtocolError("retire is not a bool")
    if error is not None:
        return {"outputs": [None] * n_inputs, "errors": [None] * n_inputs, "error": error[:MAX_ERROR]}
    outputs, errors = report.get("outputs"), report.get("errors")
    if not isinstance(outputs, list) or not isinstance(errors, list) or len(outputs) != n_inputs \
            or len(errors) != n_inputs:
        raise ProtocolError("outputs and errors must be lists with one entry per input")
    grids = [None if o is None else valid_grid(o) for o in outputs]
    if any(g is None and o is not None for g, o in zip(grids, outputs)):
        raise ProtocolError("an output is neither a grid nor null")
    if any(e is not None and not isinstance(e, str) for e in errors):
        raise ProtocolError("an error is neither a string nor null")
    errors = [(e or None) and e[:MAX_ERROR] for e in errors]
    errors = [e or ("the output is not a grid" if g is None else None) for g, e in zip(grids, errors)]
    return {"outputs": grids, "errors": errors, "error": None}


# ---- the program's process: confine, run, report, exit ----------------------------------------------------------

def _audit(scratch: str):
    """The tripwire: clear messages for the commonest misdeeds. Not a boundary (see ``isolation``)."""
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


def _confine(ctx: "WorkerContext", limits: Limits, report_fd: int) -> None:
    """Everything between fork and the program: a session of its own, no descriptor of the worker's, limits,
    Landlock, seccomp, then the tripwire."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = sorted({0, 1, 2, report_fd} | ({ctx.ruleset_fd} if ctx.ruleset_fd is not None else set()))
    for low, high in zip(keep, keep[1:] + [1 << 20]):
        os.closerange(low + 1, high)
    mapped = _mapped_bytes()
    for limit, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, mapped +
                         limits.memory_bytes), (resource.RLIMIT_FSIZE, limits.file_bytes),
                         (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, 64)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
    os.chdir(ctx.work)
    if ctx.ruleset_fd is not None:
        landlock_enforce(ctx.ruleset_fd)
        os.close(ctx.ruleset_fd)
    if ctx.seccomp is not None:
        seccomp_load(ctx.seccomp)
    if ctx.layers.hook:
        sys.addaudithook(_audit(ctx.work))


def _run_child(code: str, inputs: list, limits: Limits, ctx: "WorkerContext", report_fd: int) -> None:
    """In the forked child: confine, run, report, exit. Never returns."""
    try:
        _confine(ctx, limits, report_fd)
        namespace = {"__name__": "__program__", "np": np, "numpy": np, **DSL}
        outputs, errors, error = [], [], None

        def alarm(signum, frame):
            raise TimeoutError(f"call took more than {limits.call_seconds:g} s")

        signal.signal(signal.SIGALRM, alarm)
        try:
            exec(compile(code, "<program>", "exec"), namespace)
            task = namespace.get("task")
            if not callable(task):
                raise NameError("the program defines no function task(img)")
        except BaseException as e:  # noqa: BLE001 - anything the program does is its own failure
            error, task = f"{type(e).__name__}: {e}"[:MAX_ERROR], None
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
                errors.append(f"{type(e).__name__}: {e}"[:MAX_ERROR])
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
    return 1 << 30  # unknown: leave room for the interpreter and its libraries


# ---- the worker --------------------------------------------------------------------------------------------------

@dataclass
class WorkerContext:
    """What a worker prepares once for all its programs."""

    layers: Layers
    work: str  # the program's scratch directory (kept; emptied after each program)
    ruleset_fd: int | None = None  # Landlock
    seccomp: object | None = None  # the pyseccomp filter


def empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (not ``path`` itself), following no link and with no recursion: each
    subdirectory's own subdirectories are first moved up into ``path``, so a tree of any depth costs two open
    descriptors; directories a program made unreadable are made readable again."""
    root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    moved = 0
    try:
        os.chmod(root, 0o700)
        while True:
            names = os.listdir(root)
            if not names:
                return
            for name in names:
                try:
                    os.unlink(name, dir_fd=root)
                    continue
                except IsADirectoryError:
                    pass
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
                except PermissionError:
                    os.chmod(name, 0o700, dir_fd=root, follow_symlinks=False)
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
                try:
                    os.chmod(sub, 0o700)
                    for child in os.listdir(sub):
                        try:
                            os.unlink(child, dir_fd=sub)
                        except IsADirectoryError:
                            moved += 1
                            os.rename(child, f".up{moved}", src_dir_fd=sub, dst_dir_fd=root)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=root)
    finally:
        os.close(root)


def run_one(code: str, inputs: list, limits: Limits, ctx: WorkerContext) -> dict:
    """Fork a child for one program, collect its report, kill it, empty the scratch directory."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_child(code, inputs, limits, ctx, write_fd)
    os.close(write_fd)
    deadline = time.monotonic() + limits.program_seconds(len(inputs))
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
    for kill in (os.killpg, os.kill):  # its session (anything it might have started), then the child itself
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"error": f"timed out ({limits.call_seconds:g} s per call, {len(inputs)} call(s))"}
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL and not chunks:
        return {"error": f"crashed ({signal.Signals(os.WTERMSIG(status)).name})"}
    try:
        return checked_report(json.loads(b"".join(chunks)), len(inputs))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return {"error": "exited without a result"}
    except ProtocolError as e:
        return {"error": f"the program's report is not valid: {e}"}


def _prepare(setup: dict) -> WorkerContext:
    import ctypes
    import importlib

    layers = Layers(**setup["layers"])
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: its /proc files (fds, memory) need privilege
    for name in PRELOADED:
        importlib.import_module(name)
    for dtype in (np.uint8, np.int64):  # compile the numba DSL here, for the common grid types
        for name, fn in DSL.items():
            img = np.zeros((3, 3), dtype=dtype)
            if name in ("draw_line", "draw_rectangle"):
                fn(img, (0, 0), (1, 1), 1)
            elif name == "draw_pixel":
                fn(img, (0, 0), 1)
            else:
                fn(img, 1, 1)
    work = os.path.join(setup["scratch"], "work")
    os.makedirs(work, exist_ok=True)
    ctx = WorkerContext(layers, work)
    if layers.landlock:
        ctx.ruleset_fd = landlock_ruleset(readable_dirs(layers.namespaces), work, setup["landlock_abi"])
    if layers.seccomp:
        ctx.seccomp = seccomp_filter()
    return ctx


def _serve(setup: dict) -> None:
    """Worker loop: length-prefixed JSON jobs on stdin, length-prefixed JSON replies on stdout."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

    def send(message: dict) -> None:
        payload = json.dumps(message).encode()
        stdout.write(struct.pack("<I", len(payload)) + payload)
        stdout.flush()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctx = _prepare(setup)
    except Exception as e:  # noqa: BLE001 - told to the pool, which refuses to start
        send({"ready": False, "error": f"{type(e).__name__}: {e}"[:MAX_ERROR]})
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    send({"ready": True})
    while True:
        header = stdin.read(4)
        if len(header) < 4:
            return
        job = json.loads(stdin.read(struct.unpack("<I", header)[0]))
        reply = run_one(job["code"], job["inputs"], Limits(**job["limits"]), ctx)
        reply["nonce"] = job["nonce"]  # a reply a program might forge on this channel would lack it
        try:
            empty_dir(ctx.work)
        except OSError:
            reply["retire"] = True  # what the program left cannot be removed: this worker's scratch is spent
        send(reply)
        if reply.get("retire"):
            return


# ---- the pool, in the evaluator or trainer -------------------------------------------------------------------

class WorkerFailure(RuntimeError):
    """A worker stalled, died or broke the protocol."""


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise WorkerFailure("stalled (no reply in time)")
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise WorkerFailure("died")
        data += chunk
    return data


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise WorkerFailure("stalled (does not read its jobs)")
        try:
            view = view[os.write(fd, view[:65536]):]
        except (BrokenPipeError, ConnectionResetError):
            raise WorkerFailure("died") from None


@dataclass
class _Worker:
    proc: subprocess.Popen
    scratch: str | None = None  # the host directory it works in (without the namespaces layer)

    def read_message(self, deadline: float, cap: int) -> dict:
        fd = self.proc.stdout.fileno()
        size = struct.unpack("<I", _read_exact(fd, 4, deadline))[0]
        if size > cap:
            raise WorkerFailure(f"broke the protocol (a {size}-byte reply)")
        try:
            return json.loads(_read_exact(fd, size, deadline))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise WorkerFailure("broke the protocol (a reply that is not JSON)") from None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bubblewrap and its namespace: every process in it
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.scratch:
            try:
                empty_dir(self.scratch)
                os.rmdir(self.scratch)
            except OSError:
                pass


class SandboxPool:
    """N sandbox workers; ``run`` executes many programs in parallel and returns their results in order.

    A worker ends when its job pipe closes, so none outlives the pool (``PR_SET_PDEATHSIG`` would kill a worker
    started by a thread that has since ended: replacements are started by the thread whose program failed).

    ``layers`` are the isolation layers wanted (all by default); one this machine lacks is refused with
    ``SandboxUnavailable`` unless ``unsafe``. ``isolation`` says what runs (for logs and summaries)."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), layers: Layers = Layers(),
                 unsafe: bool = False):
        self.limits = limits
        self.layers, self.isolation = resolve(layers, unsafe)
        self.size = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
        self.replaced = 0
        started = [self._spawn() for _ in range(self.size)]
        self._workers: list[_Worker] = []
        self._free: queue.Queue = queue.Queue()
        try:
            for w in started:
                self._ready(w)
                self._workers.append(w)
                self._free.put(w)
        except BaseException:
            for w in started:
                w.kill()
            raise

    def _spawn(self) -> _Worker:
        setup = {"layers": asdict(self.layers), "landlock_abi": self.isolation["landlock_abi"]}
        scratch = None
        if self.layers.namespaces:
            setup["scratch"] = SCRATCH
            cmd = bwrap_command(["-m", "arc25_fast.sandbox.pool", json.dumps(setup)], self.limits.scratch_bytes)
            cwd = "/"
        else:
            scratch = tempfile.mkdtemp(prefix="arc25-sandbox-")
            setup["scratch"] = scratch
            cmd = [sys.executable, "-m", "arc25_fast.sandbox.pool", json.dumps(setup)]
            cwd = scratch
        env = worker_env(self.layers.namespaces)  # bubblewrap passes its own environment on: the worker's
        if not self.layers.clean_env:
            env = {**os.environ, **env}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True)
        return _Worker(proc, scratch)

    def _ready(self, worker: _Worker) -> None:
        try:
            message = worker.read_message(time.monotonic() + READY_SECONDS, 4096)
        except WorkerFailure as e:
            worker.proc.kill()
            err = worker.proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
            raise RuntimeError(f"a sandbox worker did not start: {err[0]}") from None
        finally:
            worker.proc.stderr.close()
        if message.get("ready") is not True:
            raise RuntimeError(f"a sandbox worker did not start: {str(message.get('error'))[:MAX_ERROR]}")

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self.replaced += 1
        new = self._spawn()
        self._ready(new)
        self._workers[self._workers.index(worker)] = new
        return new

    def _one(self, code: str, inputs: list[np.ndarray]) -> RunResult:
        nonce = secrets.token_hex(16)
        job = json.dumps({"code": code, "inputs": [np.asarray(g).tolist() for g in inputs],
                          "limits": asdict(self.limits), "nonce": nonce}).encode()
        worker = self._free.get()
        start = time.perf_counter()
        deadline = time.monotonic() + self.limits.program_seconds(len(inputs)) + REPLY_MARGIN
        try:
            _write_all(worker.proc.stdin.fileno(), struct.pack("<I", len(job)) + job, deadline)
            reply = worker.read_message(deadline, 2 * MAX_REPORT_BYTES)
            if not isinstance(reply, dict) or reply.pop("nonce", None) != nonce:
                raise ProtocolError("a reply to another job")
            report = checked_report(reply, len(inputs))
            if reply.get("retire"):
                worker = self._replace(worker)
        except (WorkerFailure, ProtocolError) as e:
            what = f"broke the protocol ({e})" if isinstance(e, ProtocolError) else str(e)
            report = {"outputs": [None] * len(inputs), "errors": [None] * len(inputs),
                      "error": f"sandbox worker {what}"}
            worker = self._replace(worker)
        finally:
            self._free.put(worker)
        outputs = [np.array(o, dtype=np.uint8) if o is not None else None for o in report["outputs"]]
        return RunResult(outputs, report["errors"], report["error"], time.perf_counter() - start)

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
                pass
            w.kill()
        self._workers = []

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))


def pool_from(options: SandboxOptions) -> SandboxPool:
    """The pool that ``--workers``, ``--sandbox-layers``, ``--unsafe-sandbox`` and the limits ask for."""
    limits = Limits(call_seconds=options.call_seconds, memory_bytes=options.memory_mb << 20)
    return SandboxPool(options.workers or None, limits, options.isolation_layers(), options.unsafe)
