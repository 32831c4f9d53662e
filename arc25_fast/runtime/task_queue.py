"""A queue of tasks shared by every rank of a run, on one machine or many, through files in the output directory.

Each process takes the next task that is neither finished nor claimed by a live process (under an exclusive lock on
``queue/.lock``), so ranks balance tasks of uneven cost instead of each taking a fixed ``rank::world`` share. A claim
is a file ``queue/<task_id>.claim`` naming its owner (host, pid, the pid's start time) and touched every
``HEARTBEAT_S`` seconds by a thread while the owner lives. A claim is stale, and its task taken again, when its owner
was on this host and is gone (``kill -9`` then ``--resume``: taken at once), or when it has not been touched for
``LEASE_S`` seconds (an owner on another machine that died). What "finished" means is the command's: a file it
writes once the task's results are safe.
"""
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .files import write_atomic

HEARTBEAT_S = 20.0
LEASE_S = 120.0


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner() -> dict:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return {"host": f"{socket.gethostname()}/{boot}", "pid": os.getpid(), "start": _start_ticks(os.getpid())}


class TaskQueue:
    """``for task_id in queue:`` yields the tasks this process claims, in the order given, until none is left."""

    def __init__(self, out: Path, task_ids: list[str], finished: Callable[[str], bool]):
        self.dir = out / "queue"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task_ids, self.finished = task_ids, finished
        self.me = _owner()
        self.current: Path | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="task-queue-heartbeat")
        self._beat.start()

    def __iter__(self) -> Iterator[str]:
        try:
            while (task_id := self.claim()) is not None:
                yield task_id
        finally:
            self.close()

    def claim(self) -> str | None:
        """The next task neither finished nor claimed by a live process, now claimed by this one."""
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for task_id in self.task_ids:
                path = self.dir / f"{task_id}.claim"
                if self.finished(task_id) or (path.exists() and not self._stale(path)):
                    continue
                write_atomic(path, json.dumps({**self.me, "task_id": task_id}))
                self.current = path
                return task_id
        self.current = None
        return None

    def _stale(self, path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            return True  # a claim cut short by a crash
        if owner.get("host") == self.me["host"]:  # gone, or a pid reused since: not the process that claimed it
            mine = (owner.get("pid"), owner.get("start")) == (self.me["pid"], self.me["start"])
            return not mine and _start_ticks(owner.get("pid", -1)) != owner.get("start")
        return age > LEASE_S

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = self.current
            if current is not None:
                try:
                    os.utime(current)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()


def wait_for_rank_zero(ready: Callable[[], None], what: str, timeout_s: float = 900.0) -> None:
    """Under a launcher, every rank waits until rank 0 has run ``ready`` (e.g. checked or emptied the output
    directory), through the launcher's rendezvous store; alone, ``ready`` just runs."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        ready()
        return
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    what = f"{what}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"  # torchrun's store outlives a restart
    key = f"arc25-fast/{what}/ready"
    if rank == 0:
        try:
            ready()
        except BaseException as e:
            store.set(key, f"error: {e}")
            raise
        store.set(key, "ok")
    else:
        store.wait([key])
        if store.get(key).decode() != "ok":
            raise RuntimeError(f"rank 0 could not start the run: {store.get(key).decode()[7:]}")
    # rank 0 hosts the store (deepspeed launcher): it must outlive every other rank's wait
    store.add(f"arc25-fast/{what}/seen", 1)
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        deadline = time.monotonic() + timeout_s
        while store.add(f"arc25-fast/{what}/seen", 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
