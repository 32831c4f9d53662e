"""Torch/DeepSpeed extension builds (CPU Adam for offload): a build directory per Python environment, build locks
found where torch really puts them, stale ones removed, and a note while an op compiles."""
import contextlib
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import torch

from .logs import note

STALE_LOCK_S = 600


def use_private_extensions_dir() -> None:
    """Build DeepSpeed/torch extensions in a directory of this Python environment (not one shared with others,
    which rebuilds whenever another environment used it), and clear a build lock left by a killed build."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        key = hashlib.sha1(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"arc25-{key}")
    remove_stale_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


def build_locks(root: Path) -> list[Path]:
    """The build locks torch may hold under ``root``: ``<root>/<op>/lock`` where ``TORCH_EXTENSIONS_DIR`` is set
    (always, here), ``<root>/<py…_cpu|cu…>/<op>/lock`` under torch's default root."""
    return [p for p in list(root.glob("*/lock")) + list(root.glob("*/*/lock")) if p.is_file()] if root.is_dir() else []


def remove_stale_locks(root: Path) -> None:
    """Remove build locks older than ``STALE_LOCK_S``: left by a killed build, torch would wait on them forever."""
    for lock in build_locks(root):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_LOCK_S:
            note(f"removing a stale extension build lock {lock} ({age / 60:.0f} min old, left by a killed build)")
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def extension_build_notes(interval: float = 5.0):
    """While DeepSpeed may compile an op (CPU Adam for offload, the first time): say so, and keep removing locks
    that turn stale meanwhile, so a first offload run neither looks hung nor waits forever on a dead build."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    stop, seen = threading.Event(), set()

    def watch() -> None:
        while not stop.wait(interval):
            for lock in build_locks(root):
                if lock not in seen:
                    seen.add(lock)
                    note(f"compiling the DeepSpeed op {lock.parent.name} in {lock.parent} (first use in this "
                         "environment: a few minutes; later runs load it)")
            remove_stale_locks(root)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
