"""The checkout runs on any machine: nothing in it shadows an installed distribution's module (transformers imports
the ``kernels`` distribution, and ``python -m pytest`` or ``python train_ds.py`` put the checkout first on
sys.path), and the scripts that start there do start."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_folder_or_module_of_the_checkout_shadows_an_installed_one():
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | \
        {p.stem for p in ROOT.glob("*.py")}
    assert ours <= {"arc25_fast", "setup", "train_ds"}, ours  # kernels/ has no __init__.py: arc25_fast.kernels
    installed = set(importlib.metadata.packages_distributions())
    assert not (ours - {"arc25_fast"}) & installed


def test_kernels_import_as_arc25_fast_kernels_from_the_checkout():
    code = ("import importlib.util, arc25_fast.kernels.attention as a; spec = importlib.util.find_spec('kernels'); "
            "print(a.__file__); print(spec.origin if spec else None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    ours, theirs = done.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "attention.py"
    assert theirs == "None" or not Path(theirs).resolve().is_relative_to(ROOT)


def test_train_ds_starts_from_the_checkout():
    """The script's folder is first on sys.path, as under ``deepspeed train_ds.py`` or ``torchrun train_ds.py``."""
    done = subprocess.run([sys.executable, "train_ds.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--ds-config" in done.stdout, done.stderr[-2000:]
