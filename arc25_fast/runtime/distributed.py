"""The process group: joining the launcher's (or a group of this process alone), collectives that name what they
waited for when a peer stalls, and the device of this rank."""
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class CollectiveTimeout(RuntimeError):
    """A collective did not complete: a peer rank stalled or died."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed(device_type: str) -> None:
    """Import DeepSpeed without its accelerator probe's warning, and without building its CPU shared-memory
    all-reduce op: that op serves only tensor-parallel inference, and building it into the shared torch-extensions
    cache is what a killed first start can wedge (a stale lock every later run waits on forever)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if device_type == "cpu":  # also skips DeepSpeed's probe of every op (compiler runs that print linker errors)
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def init_distributed(device_type: str, timeout_s: float = 900.0, private: bool = False) -> tuple[int, int, int]:
    """Join the process group the launcher set up, or make a one-process group (``arc25-fast train``).

    ``private``: a group of this process alone even under a launcher (``ttt``: every rank trains its own tasks).
    """
    prepare_deepspeed(device_type)
    import deepspeed

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    own = "RANK" not in os.environ or private
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                            "TORCHELASTIC_USE_AGENT_STORE")}
    if own:  # under torchrun, not the agent's store either: every rank there would claim rank 0 of it
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                          TORCHELASTIC_USE_AGENT_STORE="False")
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))
    if own:  # leave the environment as it was: processes started later must not inherit this group's address
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def init_private(timeout_s: float) -> tuple[int, int, torch.device]:
    """For commands whose ranks work apart (``ttt``, ``search-and-learn``): this rank and the launcher's world size,
    a process group of this process alone, and its device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type, timeout_s, private=True)
    if device_type == "cpu":
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return rank, world, device


def apply_collective_timeout(timeout_s: float) -> None:
    """Give every process group this run's collective timeout: DeepSpeed creates its own groups (e.g. ZeRO's
    gradient reduction) with torch's defaults (30 minutes on gloo), which would outlast a stalled peer."""
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def all_reduce(values: list[float] | torch.Tensor, device: torch.device, what: str,
               op=dist.ReduceOp.SUM) -> list[float]:
    """Sum (or ``op``) ``values`` over ranks in float64 (one host sync, none for host values on one rank); a timeout
    names what was being reduced."""
    if not torch.is_tensor(values) and dist.get_world_size() == 1:
        return [float(v) for v in values]  # host values of one rank: no round trip through the device
    t = values.to(device, torch.float64) if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64,
                                                                                        device=device)
    if dist.get_world_size() > 1:
        try:
            dist.all_reduce(t, op=op)
        except RuntimeError as e:
            raise CollectiveTimeout(f"rank {dist.get_rank()}: all-reduce of {what} failed: a peer rank stalled or "
                                    f"died ({str(e).splitlines()[0][:200]})") from None
    return t.tolist()


def barrier(what: str) -> None:
    if dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise CollectiveTimeout(f"rank {dist.get_rank()}: barrier at {what} failed: a peer rank stalled or died "
                                    f"({str(e).splitlines()[0][:200]})") from None
