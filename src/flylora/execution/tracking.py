"""Parent-side bookkeeping that lets one sample neither outlive itself nor starve another:

- `uid_lease()`: a uid no other running sample holds (an flock per uid, so concurrent flylora
  processes agree too), from a range no account uses. RLIMIT_NPROC counts per real uid, so a
  fork bomb exhausts only its own sample's allowance; the uid also names every process of the
  sample, whatever session or process group it moved to.
- `SampleCgroups`: pids and memory cgroups (v1 or v2) beneath our own, with `pids.max` and a
  memory cap for the whole sample, when the hierarchy is writable (root). A process cannot
  leave them (the cgroup fs is not in its view, and it has no capability to write there).
- `leftovers()` / `kill_all()`: find a sample's processes by uid, session, cgroup or pid
  namespace and SIGKILL them until none is left (zombies count as gone).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
import time
from pathlib import Path

UID_BASE, UID_COUNT = 61000, 2000


def _account_exists(uid: int) -> bool:
    try:
        import pwd

        pwd.getpwuid(uid)
        return True
    except (ImportError, KeyError):
        return False


def _lease_folder() -> Path:
    # one place per machine whatever TMPDIR says, so every flylora process sees the same locks
    folder = Path("/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()) / "flylora-sandbox-uids"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


@contextlib.contextmanager
def unleased(uid: int):
    """Hold `uid`'s lease while the block runs if no sample holds it (yields True), else yield
    False: a process of a uid that nobody leases is a leak; one of a leased uid may belong to the
    sample that took the uid after ours released it (concurrent evaluations)."""
    fd = os.open(_lease_folder() / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def uid_lease():
    """Yield a uid held by no other sample (None when not root: nothing to switch to)."""
    if os.geteuid() != 0:
        yield None
        return
    folder = _lease_folder()
    for uid in range(UID_BASE, UID_BASE + UID_COUNT):
        if _account_exists(uid):
            continue
        fd = os.open(folder / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)  # releases the lock
        return
    raise RuntimeError(f"all {UID_COUNT} sandbox uids from {UID_BASE} are in use")


def _own_cgroups() -> list[tuple[str, Path]]:
    """(controller, folder of this process's cgroup) for each writable-looking pids/memory
    hierarchy: cgroup v1 mounts, or cgroup v2 where the controller is available. A sample's
    cgroups go beneath our own, so every limit set on us still applies to it."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    v1 = {}
    for line in own:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            v1[c] = path
    found, seen = [], set()
    for line in mounts:
        _, where, fstype, opts = line.split()[:4]
        for c in ("pids", "memory"):
            if c in seen:
                continue
            if fstype == "cgroup" and c in opts.split(",") and c in v1:
                found.append((c, Path(where + v1[c].rstrip("/"))))
                seen.add(c)
            elif fstype == "cgroup2" and "" in v1 and c in _read(Path(where) / "cgroup.controllers").split():
                found.append((c, Path(where + v1[""].rstrip("/"))))
                seen.add(c)
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class SampleCgroups:
    """One sample's cgroups, beneath our own: pids (`pids.max`) and memory (`memory.max` /
    `memory.limit_in_bytes`, all its processes together). Empty (`paths == []`) where no
    hierarchy is writable (not root, or a read-only cgroup fs)."""

    def __init__(self, name: str, pids_max: int, memory_bytes: int):
        self.paths: list[Path] = []
        self.features: list[str] = []
        if os.geteuid() != 0:
            return
        for controller, own in _own_cgroups():
            path = own / name  # the sample's folder name, flylora-sandbox-…
            try:
                if (own / "cgroup.subtree_control").exists():  # v2: children need it enabled
                    if controller not in _read(own / "cgroup.subtree_control").split():
                        (own / "cgroup.subtree_control").write_text(f"+{controller}")
                    limit = {"pids": ("pids.max", pids_max), "memory": ("memory.max", memory_bytes)}
                else:
                    limit = {"pids": ("pids.max", pids_max), "memory": ("memory.limit_in_bytes", memory_bytes)}
                if path in self.paths:  # v2: one folder holds both controllers
                    (path / limit[controller][0]).write_text(str(limit[controller][1]))
                    self.features.append(f"cgroup-{controller}")
                    continue
                path.mkdir()
                try:
                    (path / limit[controller][0]).write_text(str(limit[controller][1]))
                except OSError:
                    path.rmdir()
                    raise
                self.paths.append(path)
                self.features.append(f"cgroup-{controller}")
            except OSError:
                continue

    def pids(self) -> list[int]:
        return sorted({int(p) for path in self.paths for p in _read(path / "cgroup.procs").split()})

    def remove(self, wait_s: float = 10.0) -> bool:
        """Kill what is inside until it is empty, then remove it; False if it would not empty."""
        deadline = time.monotonic() + wait_s
        left = list(self.paths)
        while left:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for path in list(left):
                with contextlib.suppress(OSError):
                    if path.exists():
                        path.rmdir()
                    left.remove(path)
            if left and time.monotonic() > deadline:
                return False
            if left:
                time.sleep(0.01)
        return True


def _status(pid: str) -> dict[str, str]:
    fields = {}
    for line in _read(Path("/proc") / pid / "status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _session(pid: str) -> int | None:
    stat = _read(Path("/proc") / pid / "stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[3])  # fields after the command: state ppid pgrp session
    except (IndexError, ValueError):
        return None


def leftovers(uid: int | None = None, session: int | None = None) -> list[int]:
    """Live (non-zombie) processes with this uid or in this session. /proc/PID belongs to the
    process's effective uid, which a sample without capabilities cannot change."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            owner = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if (uid is not None and owner == uid) or (session is not None and _session(entry) == session):
            if not _status(entry).get("State", "Z").startswith(("Z", "X")):
                found.append(int(entry))
    return found


def descendants(root: int) -> list[int]:
    """Live processes whose parent chain leads to `root` (not `root` itself)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _status(entry)
            if st and not st.get("State", "").startswith(("Z", "X")) and st.get("PPid", "").isdigit():
                parent[int(entry)] = int(st["PPid"])
    found, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found += frontier
    return found


def kill_tree(root: int, wait_s: float = 10.0) -> list[int]:
    """SIGKILL every descendant of `root` until none is left; returns what survived."""
    return _kill_until_gone(lambda: descendants(root), wait_s)


def kill_all(uid: int | None = None, session: int | None = None, wait_s: float = 10.0) -> list[int]:
    """SIGKILL every process found by `leftovers` until none is left; returns what survived."""
    return _kill_until_gone(lambda: leftovers(uid, session), wait_s)


def _kill_until_gone(find, wait_s: float) -> list[int]:
    """SIGKILL what `find()` returns, again and again, until it returns nothing or `wait_s` ends."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = find()
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
