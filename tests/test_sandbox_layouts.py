"""The sandbox starts, with every layer, wherever the interpreter and its packages live: a venv under /tmp, packages
on PYTHONPATH (as ``pip --target`` leaves them), packages in the user site. Each layout runs in a child process
that starts a pool, runs a correct program and three attacks (a file outside, the network, a process); the
attacks are the escape suite's, which checks that each works without its layers."""
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from arc25_fast.sandbox.isolation import detect

ROOT = Path(__file__).resolve().parent.parent
missing = {k: v for k, v in detect().items() if v is not True and k != "landlock_abi"}
pytestmark = pytest.mark.skipif(bool(missing), reason=f"this machine lacks sandbox layers: {missing}")

CHILD = r'''
import json, sys
import numpy as np
from arc25_fast.sandbox.pool import Limits, SandboxPool
secret, port = sys.argv[1], int(sys.argv[2])
programs = {
    "good": "def task(img):\n    return img[::-1]",
    "reads a file": f"def task(img):\n    return [[int(open({secret!r}).read())]]",
    "reaches the network": "import socket\ndef task(img):\n"
                           f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return [[1]]",
    "starts a process": "import os\ndef task(img):\n    os.execv('/bin/true', ['true'])",
}
img = [np.array([[1, 2], [3, 4]], dtype=np.uint8)]
with SandboxPool(workers=1, limits=Limits(call_seconds=2.0)) as pool:
    results = pool.run([(code, img) for code in programs.values()])
    import pyseccomp
    print(json.dumps({"layers": pool.isolation["layers"], "pyseccomp": pyseccomp.__file__,
                      "results": {k: [r.ok, [o.tolist() if o is not None else None for o in r.outputs],
                                      r.error or " ".join(e or "" for e in r.errors)]
                                  for k, r in zip(programs, results)}}))
'''


def site_packages() -> str:
    return str(Path(sysconfig.get_paths()["purelib"]).resolve())


def copy_module(name: str, into: Path) -> None:
    """A copy of one of the sandbox's packages, so that the child imports it from ``into`` and nowhere else."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    into.mkdir(parents=True, exist_ok=True)
    if spec.submodule_search_locations:
        shutil.copytree(list(spec.submodule_search_locations)[0], into / name)
    else:
        shutil.copy(spec.origin, into)


def run_child(python: str, env: dict, tmp_path: Path, *flags: str) -> dict:
    secret = tmp_path / "secret.txt"
    secret.write_text("7")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        done = subprocess.run([python, *flags, "-c", CHILD, str(secret), str(server.getsockname()[1])],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_held(report: dict, pyseccomp_from: Path) -> None:
    assert set(report["layers"]) == {"namespaces", "landlock", "seccomp", "clean_env", "hook"}
    assert Path(report["pyseccomp"]).resolve().parent == pyseccomp_from.resolve()
    results = report["results"]
    assert results["good"][:2] == [True, [[[3, 4], [1, 2]]]], results["good"]
    for attack in ("reads a file", "reaches the network", "starts a process"):
        ok, outputs, _ = results[attack]
        assert not (ok and outputs == [[[7]]] or ok and outputs == [[[1]]]), (attack, results[attack])


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def test_a_venv_under_tmp(tmp_path):
    """The interpreter itself under /tmp: the worker's private /tmp must not hide it."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the venv's packages: the running environment's, through a .pth file, plus its own copy of pyseccomp
    copy_module("pyseccomp", Path(purelib))
    Path(purelib, "outer.pth").write_text(site_packages() + "\n")
    report = run_child(str(python), base_env(PYTHONPATH=str(ROOT)), tmp_path)
    assert_held(report, Path(purelib))


def test_packages_on_pythonpath(tmp_path):
    """``pip --target DIR`` + ``PYTHONPATH=DIR``, and no site-packages at all (``-S``)."""
    target = tmp_path / "target"
    copy_module("pyseccomp", target)
    report = run_child(sys.executable, base_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(target), site_packages()])),
                       tmp_path, "-S")
    assert_held(report, target)


def test_packages_in_the_user_site(tmp_path):
    """``pip install --user``: the base interpreter (a venv has no user site) with the packages in its user site."""
    python = getattr(sys, "_base_executable", sys.executable)
    env = base_env(PYTHONUSERBASE=str(tmp_path / "userbase"))
    user_site = subprocess.run([python, "-c", "import site; print(site.getusersitepackages())"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip()
    copy_module("pyseccomp", Path(user_site))
    Path(user_site, "outer.pth").write_text(site_packages() + "\n")
    report = run_child(python, {**env, "PYTHONPATH": str(ROOT)}, tmp_path)
    assert_held(report, Path(user_site))
