"""The optimizer engine of one process (``--engine local``): plain PyTorch where DeepSpeed has nothing to shard.

On one GPU, ZeRO-2 still runs its whole machinery: a hook per parameter, gradients copied into reduction buckets,
reductions on a side stream, an overflow check and a norm read back to the host. Here a step is: gradients of the
(bf16) weights accumulated into fp32 master gradients, their global norm and a non-finite flag computed on the
device, clipping by a device-side factor, one fused AdamW over the fp32 master weights that skips the update itself
when the flag is set (``found_inf``: weights and optimizer state unchanged, as DeepSpeed skips such a step), and the
master weights cast back into the model's. Nothing in a step reads a device value on the host: the norm is read with
the step's loss, in the one sync ``optimizer_step`` makes.

It has the part of DeepSpeed's engine interface the trainers use (call, ``backward``, ``step``, ``optimizer``,
``zero_grad``, ``train``/``eval``, ``save_checkpoint``/``load_checkpoint`` in a folder of its own, ``engine.pt``),
``grad_norm`` (a device tensor, read with the loss) and ``reset`` for ``trainer.reset``. A checkpoint of one engine
does not load into the other.
"""
from pathlib import Path

import torch
from torch import nn

STATE_FILE = "engine.pt"


class LocalEngine:
    def __init__(self, module: nn.Module, params: list[nn.Parameter], lr: float, weight_decay: float,
                 grad_clip: float, grad_accum: int):
        self.module = module
        self.params = params
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self._micro = 0
        self.mixed = any(p.dtype != torch.float32 for p in params)  # else the weights are their own master copy
        self.master = [p.detach().float().clone() for p in params] if self.mixed else params
        if self.mixed:
            for m in self.master:
                m.grad = torch.zeros_like(m)
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay, fused=True)
        self.grad_norm = torch.zeros((), device=params[0].device)

    def __call__(self, **inputs):
        return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def _master_grads(self) -> list[torch.Tensor]:
        """The fp32 gradients of this optimizer step (a parameter the loss never reached gets zeros)."""
        if not self.mixed:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return [p.grad for p in self.params]
        grads = [p.grad for p in self.params if p.grad is not None]
        masters = [m.grad for m, p in zip(self.master, self.params) if p.grad is not None]
        if grads:
            torch._foreach_add_(masters, grads)
        for p in self.params:
            p.grad = None
        return [m.grad for m in self.master]

    def step(self) -> None:
        """Called after every micro-batch, as DeepSpeed's: the update happens at the accumulation boundary."""
        grads = self._master_grads()
        self._micro += 1
        if self._micro < self.grad_accum:
            return
        self._micro = 0
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if self.grad_clip > 0:
            torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)
        self.zero_grad()
        self.grad_norm = norm

    def zero_grad(self) -> None:
        if self.mixed:
            for m in self.master:
                m.grad.zero_()
        else:
            for p in self.params:
                p.grad = None
        self._micro = 0

    def reset(self) -> None:
        """Master weights from the model's, optimizer state cleared (``trainer.reset``)."""
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.master, [p.detach().float() for p in self.params])
        self.optimizer.state.clear()
        self.zero_grad()

    def save_checkpoint(self, directory: str, tag: str, **_) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"engine": "local", "master": [m.detach() for m in self.master],
                    "optimizer": self.optimizer.state_dict()}, folder / STATE_FILE)

    def load_checkpoint(self, directory: str, tag: str, **_) -> None:
        path = Path(directory) / tag / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no local-engine state (a checkpoint of another --engine?)")
        state = torch.load(path, map_location=self.master[0].device, weights_only=True)
        if len(state["master"]) != len(self.master) or any(a.shape != b.shape
                                                           for a, b in zip(state["master"], self.master)):
            raise ValueError(f"{path}: its weights do not match this model's trainable weights")
        with torch.no_grad():
            torch._foreach_copy_(self.master, state["master"])
            if self.mixed:
                torch._foreach_copy_(self.params, self.master)
        self.optimizer.load_state_dict(state["optimizer"])
        self.zero_grad()
