"""Hostile programs against the sandbox (issue 13): each attack below once worked against the
old sandbox. Each must now fail as a sample, leak nothing into the result, and leave no
process behind. Every attack is self-bounded (a fixed number of forks, short sleeps) so even a
broken layer could not hurt the shared machine.

Checked after every run: `r.leftover == []` (the parent found nothing left to kill) and no live
process has the sample's uid, sits in its session, or carries the attack's marker."""
from __future__ import annotations

import os
import uuid

import pytest

from flylora.execution import Check, Limits, run_program, run_programs, sandbox_features
from flylora.execution.sandbox import MESSAGE_CAP
from flylora.execution.tracking import leftovers, unleased

FAST = Limits(timeout_s=3.0)
# a raw libc through a fresh _ctypes extension module: past every Python-level guard
_LIBC = (
    "import importlib.machinery, importlib.util\n"
    "so = importlib.machinery.PathFinder.find_spec('_ctypes').origin\n"
    "loader = importlib.machinery.ExtensionFileLoader('_ctypes', so)\n"
    "m = importlib.util.module_from_spec(importlib.util.spec_from_loader('_ctypes', loader))\n"
    "loader.exec_module(m)\n"
    "class c_int(m._SimpleCData):\n"
    "    _type_ = 'i'\n"
    "class CFn(m.CFuncPtr):\n"
    "    _flags_ = m.FUNCFLAG_CDECL\n"
    "    _restype_ = c_int\n"
    "libc = m.dlopen(None, 2)\n"
    "fork, setsid, sleep, _exit, write, prctl = (CFn(m.dlsym(libc, n)) for n in\n"
    "    ('fork', 'setsid', 'sleep', '_exit', 'write', 'prctl'))\n")
# HumanEval/0-like: the check's verdict comes from the test run in the checker process
ADD = Check(test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert add(1, 1) == 2\n",
            entry_point="add")


@pytest.fixture(scope="module")
def features():
    return sandbox_features()


def _marked(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue  # dead, waiting to be reaped
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/comm", "rb") as f:
                cmd += f.read()
        except OSError:
            continue
        if marker.encode() in cmd:
            found.append(int(pid))
    return found


def assert_gone(r, marker: str | None = None):
    assert r.leftover == [], r.leftover
    if r.uid is None:
        assert leftovers(session=r.pid) == []
    else:
        # the uid is checked while we hold its lease: another test's sandbox running beside this
        # one (pytest -n 2) may have taken it after this sample released it
        with unleased(r.uid) as free:
            assert leftovers(uid=r.uid if free else None, session=r.pid) == []
    if marker:
        assert _marked(marker) == []


def test_reimported_subprocess_cannot_leave_a_daemon(features):
    """Re-importing subprocess undoes the Python guard; the PID namespace (or the uid/session
    sweep) still kills the detached `sleep` with the sample."""
    marker = f"901.{uuid.uuid4().int % 10**6}"
    prog = ("import sys\n"
            "sys.modules.pop('subprocess'); sys.modules.pop('_posixsubprocess')\n"
            "import subprocess\n"
            f"subprocess.Popen(['/bin/sleep', '{marker}'], start_new_session=True)\n"
            "def add(a, b):\n    return a + b\n")
    r = run_program(prog, FAST, ADD)
    assert r.passed, r.detail  # the function is right; the daemon is what must not survive
    assert_gone(r, marker)


def test_ctypes_double_fork_setsid_daemon_dies_with_the_sample(features):
    marker = f"fly{uuid.uuid4().hex[:10]}"
    prog = _LIBC + (
        "if fork() == 0:\n"
        "    setsid()\n"
        "    if fork() == 0:\n"
        f"        prctl(15, b'{marker}', 0, 0, 0)\n"  # PR_SET_NAME: find it by name later
        "        sleep(20)\n"
        "    _exit(0)\n"
        "sleep(1)\n"
        "def add(a, b):\n    return a + b\n")
    r = run_program(prog, FAST, ADD)
    assert r.passed, r.detail
    assert_gone(r, marker)


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("TOPSECRET-" + uuid.uuid4().hex)
    path.chmod(0o600)
    return path


READERS = {
    "open": "raise Exception(open({p!r}).read())",
    "_io.FileIO": "import _io\nraise Exception(_io.FileIO({p!r}).read())",
    "os.open": "import os\nraise Exception(os.read(os.open({p!r}, os.O_RDONLY), 100))",
}


@pytest.mark.parametrize("how", list(READERS))
@pytest.mark.parametrize("limits", [FAST, Limits(timeout_s=3.0, namespaces=False)], ids=["full", "no-namespaces"])
def test_host_files_cannot_be_read(secret, how, limits):
    """A root-only file outside the work dir: not in the view (mount namespace), no capability
    to bypass its mode (uid of its own), and no Landlock read rule for it (also without
    namespaces, where the file is on the same filesystem)."""
    r = run_program(READERS[how].format(p=str(secret)), limits)
    assert not r.passed
    assert "TOPSECRET" not in r.detail + r.stdout + r.stderr, r.detail
    assert any(e in r.detail for e in ("FileNotFoundError", "PermissionError")), r.detail
    assert_gone(r)


def test_parent_process_is_invisible():
    """No /proc entry of the parent or of any host process: only the sample's own."""
    prog = ("import os\n"
            "seen = [os.getppid()]\n"
            "for p in (os.listdir('/proc') if os.path.isdir('/proc') else []):\n"
            "    if p.isdigit():\n"
            "        try:\n"
            "            seen.append(open(f'/proc/{p}/cmdline', 'rb').read())\n"
            "        except OSError as e:\n"
            "            seen.append(type(e).__name__)\n"
            f"seen.append(open('/proc/{os.getpid()}/cmdline', 'rb').read())\n")
    r = run_program(prog, FAST)
    assert not r.passed and "pytest" not in r.detail, r.detail
    assert_gone(r)


def test_other_sandboxes_folders_are_not_listable():
    """While a neighbour runs, a sample lists the host temp dir its own folder lives in."""
    lister = ("import os\n"
              "top = os.path.dirname(os.path.dirname(os.getcwd()))\n"
              "mine = os.path.basename(os.path.dirname(os.getcwd()))\n"
              "others = [n for n in os.listdir(top) if n.startswith('flylora-sandbox-') and n != mine]\n"
              "assert not others, others\n")
    sleeper = "import time\ntime.sleep(1.5)\n"
    results = run_programs([sleeper, lister], Limits(timeout_s=5.0, startup_s=30.0), workers=2)
    assert results[0].passed, (results[0].status, results[0].detail)
    lst = results[1]
    assert lst.passed or "PermissionError" in lst.detail, (lst.status, lst.detail)
    for r in results:
        assert_gone(r)


def test_forged_status_is_not_a_pass():
    """Wrong function, plus every forgery in reach: a passed status on each open fd, the
    wire's own "done"/"defined" frames, then a clean exit 0 through raw libc. The verdict is
    the test's, run in the checker, so the sample fails."""
    prog = _LIBC + (
        "import json, struct\n"
        "for msg in (b'{\"status\": \"passed\"}\\n', ):\n"
        "    for fd in range(64):\n"
        "        write(fd, msg, len(msg))\n"
        "for tag in ('done', 'defined'):\n"
        "    frame = json.dumps([tag]).encode()\n"
        "    frame = struct.pack('>I', len(frame)) + frame\n"
        "    for fd in range(3, 64):\n"
        "        write(fd, frame, len(frame))\n"
        "_exit(0)\n"
        "def add(a, b):\n    return a - b\n")
    r = run_program(prog, FAST, ADD)
    assert not r.passed, r
    assert_gone(r)
    wrong = run_program("def add(a, b):\n    return a - b\n", FAST, ADD)
    assert not wrong.passed and "AssertionError" in wrong.detail
    right = run_program("def add(a, b):\n    return a + b\n", FAST, ADD)
    assert right.passed, right.detail


def test_oversized_messages_are_capped():
    huge = "raise Exception('x' * 61_000)\n"
    big_return = "def add(a, b):\n    return 'y' * (3 << 20)\n"  # a reply frame over 1 MiB
    bad_frame = _LIBC + ("import struct\n"
                         "for fd in range(3, 64):\n"
                         "    write(fd, struct.pack('>I', 2**31), 4)\n"
                         "def add(a, b):\n    return a + b\n")
    results = [run_program(huge, FAST), run_program(huge, FAST, ADD),
               run_program(big_return, FAST, ADD), run_program(bad_frame, FAST, ADD)]
    for r in results:
        assert not r.passed and len(r.detail) <= MESSAGE_CAP, (r.status, len(r.detail))
        assert_gone(r)
    assert results[0].detail.startswith("Exception: xxx")


def test_fork_loop_does_not_starve_a_neighbour(features):
    """A raw-libc fork loop (bounded: 300 forks, children sleep 4 s) beside two benign samples
    that start threads: the loop hits its own uid's process limit (or its cgroup's), the
    neighbours still pass."""
    if not {"uid-per-sample", "cgroup-pids"} & set(features):
        pytest.skip("not root: samples share the caller's uid and process limit (documented)")
    loop = _LIBC + (
        "refused = 0\n"
        "for _ in range(300):\n"
        "    pid = fork()\n"
        "    if pid == 0:\n"
        "        sleep(4)\n"
        "        _exit(0)\n"
        "    refused += pid < 0\n"
        "sleep(1)\n"
        "assert refused == 0, f'{refused} forks refused'\n")
    benign = ("import threading, time\n"
              "time.sleep(0.5)\n"
              "ts = [threading.Thread(target=sum, args=([1, 2],)) for _ in range(8)]\n"
              "[t.start() for t in ts]\n"
              "[t.join() for t in ts]\n")
    results = run_programs([loop, benign, benign], Limits(timeout_s=4.0, max_processes=32), workers=3)
    assert "forks refused" in results[0].detail, results[0].detail
    assert results[1].passed and results[2].passed, (results[1].detail, results[2].detail)
    for r in results:
        assert_gone(r)


def test_features_report_the_layers(features):
    assert "rlimits" in features and "python-guards" in features
    if os.geteuid() == 0 and "pidns" in features:  # CI and the dev box: the full set
        for f in ("mountns", "netns", "fs-view", "own-proc", "uid-per-sample", "no-capabilities"):
            assert f in features, features


def test_disk_fill_is_capped(features):
    """Many files, each under the 1 MiB file-size limit: the work dir is a size-capped tmpfs,
    so the host disk is never touched (bounded: at most 200 MiB if the cap were missing)."""
    if "work-tmpfs" not in features:
        pytest.skip("no private view: the work dir is a host folder")
    prog = ("for i in range(200):\n"
            "    with open(f'f{i}', 'wb') as f:\n"
            "        f.write(b'x' * (1 << 20))\n")
    r = run_program(prog, Limits(timeout_s=5.0, work_mb=16))
    assert not r.passed and "No space left" in r.detail, r.detail
    assert_gone(r)


def test_memory_of_all_processes_together_is_capped(features):
    """RLIMIT_AS is per process; four raw forks each touching 100 MiB stay under it but not
    under the sample's memory cgroup (256 MiB here): the kernel kills inside the sample."""
    if "cgroup-memory" not in features:
        pytest.skip("no writable memory cgroup here")
    prog = _LIBC + (
        "waitpid = CFn(m.dlsym(libc, 'waitpid'))\n"
        "for _ in range(4):\n"
        "    if fork() == 0:\n"
        "        blob = b'x' * (100 << 20)\n"
        "        sleep(1)\n"
        "        _exit(0)\n"
        "st = c_int()\n"
        "codes = []\n"
        "for _ in range(4):\n"
        "    waitpid(-1, m.byref(st), 0)\n"
        "    codes.append(st.value)\n"
        "assert codes == [0] * 4, f'children ended with {codes}'\n")
    r = run_program(prog, Limits(timeout_s=5.0, sample_memory_mb=256))
    assert not r.passed and ("children ended" in r.detail or r.status == "killed"), r.detail
    assert_gone(r)
    ok = run_program(prog, Limits(timeout_s=5.0, sample_memory_mb=1024))  # 400 MiB fits
    assert ok.passed, ok.detail


def test_namespaces_mounts_and_handles_are_refused(features):
    """seccomp: no new user (or any) namespace, no mount, no open-by-handle, no io_uring, no
    non-unix socket, past the Python guards; threads (clone without CLONE_NEW*) still work."""
    if "seccomp" not in features:
        pytest.skip("no seccomp filter on this architecture")
    prog = _LIBC + (
        "import threading\n"
        "unshare, mount, syscall, socket = (CFn(m.dlsym(libc, n)) for n in\n"
        "    ('unshare', 'mount', 'syscall', 'socket'))\n"
        "got = {'unshare(CLONE_NEWUSER)': unshare(0x10000000),\n"
        "       'mount': mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
        "       'open_by_handle_at': syscall(304 if %r == 'x86_64' else 265, -100, None, 0),\n"
        "       'io_uring_setup': syscall(425, 1, None),\n"
        "       'udp socket': socket(2, 2, 0), 'raw socket': socket(17, 3, 0)}\n"
        "assert socket(1, 1, 0) >= 0, 'unix sockets stay allowed'\n"
        "t = threading.Thread(target=sum, args=([1],)); t.start(); t.join()\n"
        "assert all(v == -1 for v in got.values()), got\n"
        "raise Exception('all refused')\n") % os.uname().machine
    r = run_program(prog, FAST)
    assert r.detail == "Exception: all refused", r.detail
    assert_gone(r)
