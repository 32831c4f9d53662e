"""Operators dispatched and host-device synchronisations of a block of code, counted on any device.

A GPU step is slow when the host waits for the device (a read of a device value: ``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``int``/``float``/``bool`` of a tensor, ``torch.cuda.synchronize``, a collective the
host blocks on) or dispatches many small operators. On the CPU neither shows as time, so this counts them instead:
a test pins the counts of a training step and of a decode step, and ``benchmarks/step_overhead.py`` reports them.

A read counts as a sync only when it reads a *device value*: a tensor named as device-resident (the model's
parameters), or the output of an operator run inside the block that made a new tensor (a factory or
``torch.tensor(data)``: on a GPU the step makes them on the device) or read a device value. Host data from the
loader, and what is computed from it alone, stays on the host in a GPU run too and is not counted.
"""
import contextlib
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

READS = ("tolist", "numpy", "cpu")  # Tensor methods that copy a value to the host (item & co. dispatch an operator)
COLLECTIVES = ("all_reduce", "barrier", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


class StepAudit(TorchDispatchMode):
    """``with StepAudit(model.parameters()) as audit: ...``; then ``audit.ops`` and ``audit.syncs`` (Counters)."""

    def __init__(self, device_tensors=()):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self._device = WeakTensorKeyDictionary()
        for t in device_tensors:
            self._device[t] = True
        self._patches = contextlib.ExitStack()

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        if func is torch.ops.aten._local_scalar_dense.default and self.is_device(args[0]):
            self.syncs["item"] += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fresh = func is torch.ops.aten.lift_fresh.default  # torch.tensor(data) in the block: made on the device
        if fresh or not inputs or any(self.is_device(t) for t in inputs):  # a factory, or from device values
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
        return out

    def _patch(self, owner, name: str, counts) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def counted(*args, **kwargs):
            if counts(*args, **kwargs):
                self.syncs[name] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._patches.callback(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def __enter__(self):
        for name in READS:
            self._patch(torch.Tensor, name, lambda t, *a, **k: self.is_device(t))
        if dist.is_available():
            for name in COLLECTIVES:
                if hasattr(dist, name):
                    self._patch(dist, name, lambda *a, **k: True)
        if torch.cuda.is_available():
            self._patch(torch.cuda, "synchronize", lambda *a, **k: True)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def summary(self) -> dict:
        return {"ops": sum(self.ops.values()), "syncs": sum(self.syncs.values()), "sync_kinds": dict(self.syncs),
                "top_ops": dict(self.ops.most_common(12))}
