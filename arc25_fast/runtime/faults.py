"""How a run stops on purpose: preemption signals and runs of non-finite steps, each with its own exit status.

- SIGTERM or SIGINT (on any rank): every rank finishes its current step, writes a checkpoint and exits with
  ``EXIT_PREEMPTED``; ``--resume`` continues exactly. A second SIGINT aborts at once.
- A step whose loss or gradient norm is not finite is skipped (weights and optimizer state unchanged) and counted;
  ``max_bad_steps`` of them in a row stop the run with ``EXIT_NON_FINITE``, writing no checkpoint and no final
  adapter, so the newest checkpoint is the last good one.
"""
import math
import signal

EXIT_BAD_INPUT = 1
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" for schedulers that requeue


class RunStopped(Exception):
    """The run stopped before ``max_steps``; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the loop can stop at a step boundary with a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


class NonFiniteSteps:
    """Counts consecutive skipped (non-finite) steps and the total."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, loss: float, grad_norm: float) -> bool:
        """True when this step was bad (and so skipped)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += bad
        return bad

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
