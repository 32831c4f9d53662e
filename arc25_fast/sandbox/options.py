"""The sandbox's options, as a part of a command's config (each option declared once)."""
from dataclasses import dataclass

from ..runtime.options import option
from .isolation import Layers, parse_layers


@dataclass(frozen=True)
class SandboxOptions:
    """How model-written programs run: the pool's size, its isolation layers and each program's limits."""

    workers: int = option(0, "Sandbox worker processes (0: one per core).", min=0)
    layers: str = option("all", "Isolation of model-written programs: all, none, or a comma list of namespaces, "
                         "landlock, seccomp, clean_env, hook (docs/SECURITY.md); anything less than all needs "
                         "--unsafe-sandbox.", name="sandbox_layers")
    unsafe: bool = option(False, "Run model-written programs with fewer isolation layers than all (those "
                          "--sandbox-layers leaves out, or that this machine lacks); the summary records it.",
                          name="unsafe_sandbox")
    call_seconds: float = option(2.0, "Wall-clock limit per call of a program's task(img).", min=0.01)
    memory_mb: int = option(1024, "Memory a program may allocate (MiB).", min=16)

    def isolation_layers(self) -> Layers:
        """The layers asked for; fewer than all without ``--unsafe-sandbox`` is refused here, before any work."""
        return parse_layers(self.layers, self.unsafe)
