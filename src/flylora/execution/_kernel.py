"""Thin ctypes wrappers over the Linux isolation primitives the sandbox child uses: namespaces
(unshare), mounts and pivot_root, capabilities, prctl flags and Landlock. Every call returns
False/0 instead of raising when the kernel (or our privilege) does not offer the feature, so the
caller can degrade and report what it got.

Imported by `_child.py` by path: it must not import flylora, and it must import everything it
needs at module import time (the child later loses its view of the filesystem).
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
for _name in ("mount", "umount2", "unshare", "prctl"):
    getattr(_libc, _name).restype = ctypes.c_int

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_CAPBSET_DROP = 1, 4, 8, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_SYS = {"x86_64": {"pivot_root": 155, "capget": 125, "capset": 126},
        "aarch64": {"pivot_root": 41, "capget": 90, "capset": 91}}.get(os.uname().machine, {})
LANDLOCK_CREATE, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT = 444, 445, 446  # same on x86_64 and arm64


def errno_text():
    e = ctypes.get_errno()
    return f"{os.strerror(e)} (errno {e})"


def unshare(flags):
    return _libc.unshare(ctypes.c_int(flags)) == 0


def mount(source, target, fstype, flags, data=None):
    enc = (lambda s: None if s is None else os.fsencode(s))
    return _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def umount(target, flags=MNT_DETACH):
    return _libc.umount2(os.fsencode(target), ctypes.c_int(flags)) == 0


def pivot_root(new_root, put_old):
    if "pivot_root" not in _SYS:
        return False
    return _libc.syscall(_SYS["pivot_root"], os.fsencode(new_root), os.fsencode(put_old)) == 0


def prctl(option, arg2=0):
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capabilities():
    """(effective, permitted, inheritable) as 64-bit masks, or None if capget is unavailable."""
    if "capget" not in _SYS:
        return None
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if _libc.syscall(_SYS["capget"], ctypes.byref(header), data) != 0:
        return None
    return tuple(getattr(data[0], f) | (getattr(data[1], f) << 32)
                 for f in ("effective", "permitted", "inheritable"))


def last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


CAP_DAC_READ_SEARCH = 2


def drop_to(uid, gid, last=40, keep=0):
    """Become uid/gid with no capability left in any set but the mask `keep`: clear the
    bounding set (so nothing can be regained through file capabilities) and the ambient set,
    then setresuid away from root, which empties the permitted and effective sets (with `keep`,
    PR_SET_KEEPCAPS holds the permitted set across it and capset trims it to `keep`). Returns
    True only if capget then confirms effective == permitted == keep and no inheritable."""
    for cap in range(last + 1):
        if not keep >> cap & 1:
            prctl(PR_CAPBSET_DROP, cap)  # EINVAL past the kernel's last cap is fine
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if keep and not prctl(PR_SET_KEEPCAPS, 1):
        return False
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep:
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
        data[1].effective = data[1].permitted = keep >> 32
        if "capset" not in _SYS or _libc.syscall(_SYS["capset"], ctypes.byref(header), data) != 0:
            return False
        prctl(PR_SET_KEEPCAPS, 0)
    caps = capabilities()
    return os.getresuid() == (uid, uid, uid) and caps == (keep, keep, 0)


# Landlock access rights (include/uapi/linux/landlock.h), with the ABI that introduced them.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE = (1 << 4) | (1 << 5)
FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    abi = _libc.syscall(LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # _VERSION
    return max(int(abi), 0)


def landlock(rules):
    """Confine this process and all its future children with Landlock. `rules` maps a path to
    'r' (execute, read files, list directories beneath it), 'rw' (everything beneath it),
    'dev' (a single device file: read and write) or 'ls' (list directories only). Every
    filesystem right the ABI knows is handled, so anything not granted by a rule is refused,
    whatever the uid or capabilities; with ABI >= 4 all TCP bind/connect is refused and with
    ABI >= 6 signals and abstract unix sockets cannot reach processes outside the domain.
    Returns (abi, list of what is handled) or (0, [why]) if it could not be applied."""
    abi = landlock_abi()
    if abi < 1:
        return 0, ["landlock unavailable"]
    fs = FS_READ | FS_WRITE_FILE | FS_REMOVE | FS_MAKE
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0      # bind_tcp | connect_tcp, no rule -> all refused
    scoped = 0b11 if abi >= 6 else 0   # abstract unix sockets | signals
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = _RulesetAttr(fs, net, scoped)
    ruleset = _libc.syscall(LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0, [f"landlock_create_ruleset: {errno_text()}"]
    try:
        for path, kind in rules.items():
            allowed = {"r": FS_READ, "rw": fs, "dev": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
                       "ls": FS_READ_DIR}[kind]
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path this machine lacks: nothing to grant
            try:
                if not os.path.isdir(path):
                    allowed &= FILE_ONLY
                rule = _PathBeneath(allowed & fs, fd)
                if _libc.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1),
                                 ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return 0, [f"landlock_add_rule {path}: {errno_text()}"]
            finally:
                os.close(fd)
        # required to self-restrict without CAP_SYS_ADMIN (we have none by now)
        if not prctl(PR_SET_NO_NEW_PRIVS, 1):
            return 0, [f"no_new_privs: {errno_text()}"]
        if _libc.syscall(LANDLOCK_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0, [f"landlock_restrict_self: {errno_text()}"]
    finally:
        os.close(ruleset)
    return abi, ["fs-read", "fs-write"] + (["tcp"] if net else []) + (["signals", "abstract-unix"] if scoped else [])
