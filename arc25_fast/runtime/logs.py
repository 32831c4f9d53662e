"""Where a run's messages go: one progress bar and short notes on the console, library chatter in a log file.

Transformers, DeepSpeed, PEFT and Python warnings are routed to ``<output_dir>/<name>.log`` (and to the console
too with ``--verbose``); their own progress bars are turned off so that the run's bar is the only one.
"""
import contextlib
import logging
import os
import sys
from pathlib import Path

LIBRARY_LOGGERS = ("transformers", "DeepSpeed", "deepspeed", "peft", "torch", "accelerate", "py.warnings", "numba")
_bar = None  # the active progress bar, so that notes print above it


def close_log_files() -> None:
    """Detach and close this package's log handlers (before its output directory is removed)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_arc25", False):
            root.removeHandler(handler)
            handler.close()


def setup_logging(output_dir: Path | None, verbose: bool, rank: int = 0, name: str = "train") -> Path | None:
    """Send library messages to ``output_dir/name.log`` (rank 0; other ranks to ``name_rank{r}.log``)."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    close_log_files()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    path = None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / (f"{name}.log" if rank == 0 else f"{name}_rank{rank}.log")
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._arc25 = True
        root.addHandler(handler)
    if verbose and rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console._arc25 = True
        root.addHandler(console)
    logging.captureWarnings(True)
    warnings.filterwarnings("default", category=FutureWarning)
    _quiet_libraries()
    return path


def _quiet_libraries() -> None:
    """Libraries log through the root logger (and so to the file), with their own console handlers removed."""
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_info()
    except ImportError:
        pass
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not getattr(handler, "_arc25", False):
                logger.removeHandler(handler)
        logger.propagate = True
    try:
        import deepspeed.utils.logging as ds_logging

        for logger in (ds_logging.logger, getattr(ds_logging, "accel_logger", None)):
            if logger is not None:
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                logger.propagate = True
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def set_progress_bar(bar) -> None:
    global _bar
    _bar = bar


@contextlib.contextmanager
def task_progress(name: str, total: int, initial: int, rank: int, world: int):
    """Rank 0's progress bar over tasks (None on the other ranks), with notes printed above it while it lasts."""
    if rank != 0:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="task", desc=f"{name} (rank 0 of {world})" if world > 1 else name)
    set_progress_bar(bar)
    try:
        yield bar
    finally:
        bar.close()
        set_progress_bar(None)


def note(message: str, rank: int = 0) -> None:
    """A one-line note for the user (rank 0 only), printed above the progress bar and kept in the log file."""
    logging.getLogger("arc25_fast").info(message)
    if rank != 0:
        return
    if _bar is not None:
        _bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
