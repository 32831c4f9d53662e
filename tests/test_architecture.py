"""The house's rules, checked on the package's own source: imports only go down (no circle, at most nine floors),
and no function is longer than 60 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import import_layers

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def test_imports_only_go_down_in_at_most_nine_floors():
    done = subprocess.run([sys.executable, "-m", "tests.import_layers"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = import_layers.report()
    assert not report["circles"] and not report["upward"] and report["floors"] <= import_layers.MAX_FLOORS


def test_the_checker_finds_a_circle_an_import_up_and_counts_floors(tmp_path):
    files = {"arc25_fast/__init__.py": "", "kernels/k.py": "",
             "arc25_fast/data/__init__.py": "", "arc25_fast/training/__init__.py": "",
             "arc25_fast/data/a.py": "def f():\n    from ..training import b\n",
             "arc25_fast/data/c.py": "from ..kernels import k\n",
             "arc25_fast/training/b.py": "from ..data.a import f\nfrom ..data import c\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    report = import_layers.report(tmp_path)
    assert report["circles"] == [["arc25_fast.data.a", "arc25_fast.training.b"]]
    assert report["upward"] == ["arc25_fast.data.a -> arc25_fast.training.b"]
    assert report["floors"] == 4  # a -> b -> c -> kernels.k (a circle's modules each count once on a chain)


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted((ROOT / "arc25_fast").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
