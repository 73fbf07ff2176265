"""The filesystem a sandboxed program sees: a fresh, read-only tmpfs root holding only what the
interpreter needs (system libraries, the Python install, its site-packages), bind-mounted
read-only at their usual paths, plus a few device files, a /proc of the program's own PID
namespace, and its work dir (read-write: a size-capped tmpfs, or the host folder). The host
root is unmounted after pivot_root, so there is nothing else to reach, whatever the program
later manages to do inside its mount namespace.

`needed_paths()` is also the Landlock read list when no mount namespace is available.
Imported by `_child.py` by path: no flylora imports here.
"""
import os
import sys

import _kernel as k

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
RO = k.MS_REMOUNT | k.MS_BIND | k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV


def _beneath(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def needed_paths():
    """Real directories to expose read-only: system dirs, the interpreter's prefixes and the
    site-packages on sys.path. Other sys.path entries (e.g. an editable checkout's src/) are
    left out: a program under test needs the stdlib and installed packages, not our sources."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    cands = [p for p in SYSTEM_DIRS if os.path.exists(p)] + sorted(prefixes)
    for p in sys.path:
        if p and os.path.isdir(p) and (any(_beneath(p, q) for q in prefixes)
                                        or os.path.basename(p) in ("site-packages", "dist-packages")):
            cands.append(p)
    return cands


def _place(root, path):
    """Recreate `path`'s ancestors under `root`, copying any symlink on the way (e.g. /lib ->
    usr/lib) so the same path resolves inside; returns the fully resolved host path."""
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        host = os.path.join(cur, part)
        if os.path.islink(host):
            os.makedirs(root + cur, exist_ok=True)
            if not os.path.lexists(root + host):
                os.symlink(os.readlink(host), root + host)
            cur = os.path.realpath(host)
        else:
            cur = host
    return cur


def build(root, work, own_proc, work_tmpfs=None):
    """Populate the tmpfs mounted at `root` and return the Landlock rules for the new view.
    `own_proc`: the caller is in a fresh PID namespace, so a new /proc shows only its own
    processes (otherwise no /proc at all). `work_tmpfs`: mount options for a fresh tmpfs as the
    work dir (its size caps what the program can write in all), else the host dir is bound.
    Raises OSError naming the mount that failed."""
    bound, rules = [], {}

    def bind(src, dst, flags):
        if not k.mount(src, dst, None, k.MS_BIND | k.MS_REC) or not k.mount(None, dst, None, flags):
            raise OSError(f"bind mount {src}: {k.errno_text()}")

    for path in needed_paths():
        real = _place(root, path)
        if any(_beneath(real, b) for b in bound) or not os.path.isdir(real):
            continue
        os.makedirs(root + real, exist_ok=True)
        bind(real, root + real, RO)
        bound.append(real)
        rules[real] = "r"
    for path in FILES:
        if not os.path.exists(path):
            continue
        real = _place(root, path)
        if not any(_beneath(real, b) for b in bound):
            os.makedirs(os.path.dirname(root + real), exist_ok=True)
            open(root + real, "w").close()
            bind(real, root + real, RO)
            rules[real] = "r"
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in DEVICES:
        if os.path.exists(dev):
            open(root + dev, "w").close()
            bind(dev, root + dev, k.MS_REMOUNT | k.MS_BIND | k.MS_NOSUID | k.MS_NOEXEC)
            rules[dev] = "dev"
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + work, exist_ok=True)
    if work_tmpfs:
        if not k.mount("tmpfs", root + work, "tmpfs", k.MS_NOSUID | k.MS_NODEV, work_tmpfs):
            raise OSError(f"tmpfs for the work dir: {k.errno_text()}")
    else:
        bind(work, root + work, k.MS_REMOUNT | k.MS_BIND | k.MS_NOSUID | k.MS_NODEV)
    rules[work] = "rw"
    os.makedirs(root + "/proc", exist_ok=True)
    if own_proc and k.mount("proc", root + "/proc", "proc", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC):
        rules["/proc"] = "r"  # our own PID namespace's: only this program's processes
    rules["/"] = "ls"  # list directories of this small tree (files stay per rule)
    if not k.mount(None, root, None, RO):
        raise OSError(f"remount the new root read-only: {k.errno_text()}")
    return rules


def enter(root, work):
    """Make `root` (a tmpfs mounted there) this process's /, drop the host root from the mount
    namespace, and cd into `work`."""
    os.chdir(root)
    if not k.pivot_root(".", "."):
        raise OSError(f"pivot_root: {k.errno_text()}")
    if not k.umount("."):  # the old root, stacked on top by pivot_root(".", ".")
        raise OSError(f"unmount the old root: {k.errno_text()}")
    os.chdir("/")
    os.chdir(work)
