"""torch threads per rank: what this node's cores, its ranks and the processes already busy on it leave."""
import os

import torch

from .logs import note


def idle_cores(cpus: set[int], seconds: float = 0.25) -> float:
    """How much of the CPUs ``cpus`` other processes leave idle right now (sampled before this process starts
    working; per CPU, so that busy cores outside the set do not count)."""
    import psutil

    busy = psutil.cpu_percent(interval=seconds, percpu=True)
    return sum(1.0 - busy[c] / 100.0 for c in cpus if c < len(busy))


def set_threads(requested: int, num_workers: int) -> int:
    """torch threads of this rank: ``requested``, or OMP_NUM_THREADS when set, or this node's cores shared by its
    ranks, less one per data worker beyond the first (a worker mostly waits, but a second one competes), and less
    the cores other processes keep busy: a torch thread on a busy core makes every parallel region wait for it
    (measured: the main job is 1.8x slower with 2 threads than with 1 next to one busy process, 1.8x faster alone)."""
    if requested:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    else:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        cores = len(cpus)
        # with several local ranks the others are busy by design (and still starting): share the cores by division
        available = cores if local_ranks > 1 else min(cores, round(idle_cores(cpus)))
        threads = max(1, available // local_ranks - max(0, num_workers - 1))
        if available < cores:
            note(f"{cores - available} of {cores} cores are busy with other processes: {threads} torch thread(s) per "
                 "rank (--threads N to choose)")
    torch.set_num_threads(threads)
    return threads
