"""Torch/DeepSpeed extension builds (CPU Adam for offload): a build directory per Python environment and machine,
build locks found where torch really puts them, a lock whose builder is gone taken over at once, and honest notes.

torch's build lock (``FileBaton``) is an empty file that the building process creates and keeps open until the build
ends; a process that finds it waits until it disappears and then loads the op without building it. So a lock held
open by no process is a dead build's: left in place, every later run waits forever; removed while torch waits on it,
torch loads an op that was never built. ``build_op`` therefore removes dead locks before it loads an op, and loads
again (building it itself) when the build it waited on died."""
import contextlib
import hashlib
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from .logs import note


def use_private_extensions_dir() -> None:
    """Build DeepSpeed/torch extensions in a directory of this Python environment on this machine (not one shared
    with others, which rebuilds whenever another environment used it, or across machines, where a build's owner
    cannot be seen), and take over the build locks of builds that died."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        key = hashlib.sha1(f"{sys.prefix}|{torch.__version__}|{socket.gethostname()}".encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"arc25-{key}")
    remove_dead_locks(extensions_root())


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", ""))


def build_locks(root: Path) -> list[Path]:
    """The build locks torch may hold under ``root``: ``<root>/<op>/lock`` where ``TORCH_EXTENSIONS_DIR`` is set
    (always, here), ``<root>/<py…_cpu|cu…>/<op>/lock`` under torch's default root."""
    return [p for p in list(root.glob("*/lock")) + list(root.glob("*/*/lock")) if p.is_file()] if root.is_dir() else []


def lock_holders(lock: Path) -> list[int] | None:
    """The processes of this machine that hold ``lock`` open (torch's builder keeps its lock's descriptor open);
    None when the lock is gone."""
    try:
        target = os.stat(lock)
    except FileNotFoundError:
        return None
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    holders.append(int(pid))
                    break
    return holders


def remove_dead_locks(root: Path) -> list[Path]:
    """Remove the build locks that no process holds (their build was killed); return them."""
    removed = [lock for lock in build_locks(root) if lock_holders(lock) == []]
    for lock in removed:
        take_over(lock)
    return removed


def take_over(lock: Path) -> None:
    note(f"taking over the build lock {lock}: the build that made it no longer runs")
    lock.unlink(missing_ok=True)


def build_op(load: Callable[[], object], name: str, attempts: int = 3) -> object:
    """Load (building on first use) one op with ``load``; when the build this process waited on died, the lock is
    taken over and the op built here."""
    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

    for attempt in range(attempts):
        remove_dead_locks(extensions_root())
        _dead_builds.clear()
        try:
            with extension_build_notes():
                return load()
        except (ImportError, OSError, RuntimeError) as e:
            if attempt == attempts - 1 or not _dead_builds:
                raise
            note(f"the build of {name} that this run waited on died ({str(e).splitlines()[0][:200]}); building it here")
            for op in _dead_builds:  # torch already counts the op as built in this process: forget that
                JIT_EXTENSION_VERSIONER.entries.pop(op, None)
    raise AssertionError("unreachable")


_dead_builds: set[str] = set()  # ops whose build died while this process waited on its lock


@contextlib.contextmanager
def extension_build_notes(interval: float = 5.0):
    """While an op may compile: say who builds it (this process, or another that this one waits for), and remove a
    lock whose builder died meanwhile, so that this process stops waiting (``build_op`` then builds the op)."""
    root = extensions_root()
    stop, seen = threading.Event(), set()

    def watch() -> None:
        while True:
            for lock in build_locks(root):
                holders = lock_holders(lock)
                op = lock.parent.name
                if holders is None:
                    continue
                if not holders:
                    _dead_builds.add(op)
                    take_over(lock)
                elif (lock, tuple(holders)) not in seen:
                    seen.add((lock, tuple(holders)))
                    who = "this process is" if os.getpid() in holders else f"process {holders[0]} is"
                    note(f"{who} compiling the op {op} in {lock.parent} (first use in this environment: a few "
                         "minutes; later runs load it)")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
