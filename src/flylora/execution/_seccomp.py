"""A seccomp-bpf filter for the sandbox runner: refuse the system calls a program under test
never needs and that widen the kernel surface or bypass path-based confinement.

Refused with EPERM: creating or joining namespaces (unshare, setns, and clone with any
CLONE_NEW* flag; user namespaces are the usual road to kernel exploits), mounts of every kind,
pivot_root and chroot, open_by_handle_at / name_to_handle_at (they open files by inode, past
Landlock's path rules), ptrace, the kernel keyring, bpf, perf_event_open, userfaultfd,
io_uring (its operations are not seen by seccomp), module, kexec, reboot, swap, acct, quotactl,
and sockets of any family but AF_UNIX (no UDP/raw/netlink even where no network namespace
could be made; Landlock covers TCP only).
clone3 gets ENOSYS (its flags sit behind a pointer a filter cannot read; libc then falls back
to clone, which is checked). On x86_64 the x32 ABI is refused, and a foreign architecture
kills the process. Only x86_64 and aarch64 are known; elsewhere `install()` returns False.

The filter is inherited by every child and cannot be removed. Imported by `_child.py` by path.
"""
import ctypes
import errno
import os

import _kernel as k

_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(os.uname().machine)
_NR = {
    "x86_64": {"socket": 41, "unshare": 272, "setns": 308, "clone": 56, "clone3": 435, "mount": 165,
               "umount2": 166, "pivot_root": 155, "chroot": 161, "open_by_handle_at": 304,
               "name_to_handle_at": 303, "ptrace": 101, "keyctl": 250, "add_key": 248,
               "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
               "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
               "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
               "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
               "quotactl": 179, "open_tree": 428, "move_mount": 429, "fsopen": 430,
               "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442},
    "aarch64": {"socket": 198, "unshare": 97, "setns": 268, "clone": 220, "clone3": 435, "mount": 40,
                "umount2": 39, "pivot_root": 41, "chroot": 51, "open_by_handle_at": 265,
                "name_to_handle_at": 264, "ptrace": 117, "keyctl": 219, "add_key": 217,
                "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
                "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
                "quotactl": 60, "open_tree": 428, "move_mount": 429, "fsopen": 430,
                "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442},
}.get(os.uname().machine, {})
CLONE_NEW_ANY = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (clone: no NEWTIME)

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # struct seccomp_data (arg0's low word, little-endian)


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def program():
    """The filter as (code, jt, jf, k) tuples."""
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    p = [(_LD_W_ABS, 0, 0, _OFF_ARCH), (_JEQ, 1, 0, _ARCH), (_RET, 0, 0, _KILL_PROCESS),
         (_LD_W_ABS, 0, 0, _OFF_NR)]
    if os.uname().machine == "x86_64":
        p += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, enosys)]  # x32 system calls
    for name, nr in _NR.items():
        if name not in ("clone", "clone3", "socket"):
            p += [(_JEQ, 0, 1, nr), (_RET, 0, 0, eperm)]
    p += [(_JEQ, 0, 4, _NR["socket"]), (_LD_W_ABS, 0, 0, _OFF_ARG0), (_JEQ, 1, 0, 1),  # AF_UNIX
          (_RET, 0, 0, eperm), (_RET, 0, 0, _ALLOW)]
    p += [(_JEQ, 0, 1, _NR["clone3"]), (_RET, 0, 0, enosys),
          (_JEQ, 0, 3, _NR["clone"]), (_LD_W_ABS, 0, 0, _OFF_ARG0), (_JSET, 0, 1, CLONE_NEW_ANY),
          (_RET, 0, 0, eperm), (_RET, 0, 0, _ALLOW)]
    return p


def install():
    """Apply the filter to this process (no_new_privs must be set). True if it is in place."""
    if _ARCH is None or not _NR:
        return False
    prog = program()
    filters = (_Filter * len(prog))(*[_Filter(*ins) for ins in prog])
    fprog = _Prog(len(prog), filters)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    return k._libc.prctl(ctypes.c_int(pr_set_seccomp), ctypes.c_ulong(seccomp_mode_filter),
                         ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
