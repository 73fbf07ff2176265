"""The sandbox: hostile programs end as failed samples and nothing outside their temp dir
changes. Every hostile program here is self-bounded (a fixed number of forks, a fixed amount of
memory, a short sleep) so even a broken guard could not hurt the shared machine."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from flylora.execution import Limits, run_program, run_programs, sandbox_features

FAST = Limits(timeout_s=2.0)


@pytest.fixture(scope="module")
def features():
    return sandbox_features()


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "canary.txt").write_text("alive")
    (home / "docs" / "keep.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))  # in case anything resolves ~ in this process
    return home


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"")
                  for p in folder.rglob("*"))


# load a C extension module straight from its file, past the `sys.modules[name] = None` guard
_LOAD_EXTENSION = (
    "import importlib.machinery, importlib.util\n"
    "so = importlib.machinery.PathFinder.find_spec('{name}').origin\n"
    "loader = importlib.machinery.ExtensionFileLoader('{name}', so)\n"
    "m = importlib.util.module_from_spec(importlib.util.spec_from_loader('{name}', loader))\n"
    "loader.exec_module(m)\n")


def _group_gone(pid, wait_s=10.0):
    """True once no process of the group is left (killed children may linger a moment as
    zombies until init reaps them)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ordinary_program_passes_with_output(features):
    r = run_program("import math\nprint(math.factorial(5))\nopen('scratch.txt', 'w').write('ok')\n")
    assert r.passed, r.detail
    assert r.stdout == "120\n"
    assert "rlimits" in features and "python-guards" in features


def test_exceptions_and_exits_fail():
    assert run_program("assert 1 == 2").detail.startswith("AssertionError")
    assert not run_program("raise SystemExit(0)").passed  # exit() must not count as passing
    assert not run_program("import os\nos._exit(0)").passed


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert r.status == "timed out" and time.monotonic() - start < 10
    assert _group_gone(r.pid)


def test_fork_bomb_is_contained(features):
    # bounded: at most 50 forks, children sleep 30 s and would be reaped by the group kill
    bomb = ("import os, time\n"
            "for _ in range(50):\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(30)\n"
            "        os._exit(0)\n")
    r = run_program(bomb, FAST)
    assert not r.passed and "NoneType" in r.detail  # os.fork is disabled
    assert _group_gone(r.pid)


def test_fork_bomb_bypassing_python_guards_is_still_contained(features):
    """Reload libc's fork through a fresh ctypes extension module (dodging the Python guards):
    the kernel layers (RLIMIT_NPROC of the sample's own uid) must still stop it, and the group kill must
    reap whatever did start."""
    if "uid-per-sample" not in features:
        pytest.skip("needs the privilege drop (RLIMIT_NPROC does not bind root)")
    bomb = _LOAD_EXTENSION.format(name="_ctypes") + (
        "class c_int(m._SimpleCData):\n"
        "    _type_ = 'i'\n"
        "class CFn(m.CFuncPtr):\n"
        "    _flags_ = m.FUNCFLAG_CDECL\n"
        "    _restype_ = c_int\n"
        "libc = m.dlopen(None, 2)\n"
        "fork, sleep, _exit = (CFn(m.dlsym(libc, n)) for n in ('fork', 'sleep', '_exit'))\n"
        "refused = 0\n"
        "for _ in range(200):\n"  # bounded: at most 200 children, each sleeps 20 s then exits
        "    pid = fork()\n"
        "    if pid == 0:\n"
        "        sleep(20)\n"
        "        _exit(0)\n"
        "    refused += pid < 0\n"
        "assert refused == 0, f'{refused} forks refused'\n")
    r = run_program(bomb, Limits(timeout_s=3.0, max_processes=32))
    assert not r.passed and "forks refused" in r.detail
    assert _group_gone(r.pid)


def test_memory_bomb_is_capped():
    # bounded at 4 GiB total; RLIMIT_AS (256 MiB here) stops it long before
    bomb = "chunks = []\nfor _ in range(40):\n    chunks.append(bytearray(100 * 1024 * 1024))\n"
    r = run_program(bomb, Limits(timeout_s=5.0, memory_mb=256))
    assert not r.passed and "MemoryError" in r.detail


def test_rmtree_of_home_and_outside_writes_change_nothing(fake_home, tmp_path):
    before = _snapshot(fake_home)
    outside = tmp_path / "outside.txt"
    programs = [
        f"import shutil\nshutil.rmtree({str(fake_home)!r})",
        "import os, shutil\nshutil.rmtree(os.path.expanduser('~'))\n",
        f"import os\nos.remove({str(fake_home / 'canary.txt')!r})",
        f"import pathlib\npathlib.Path({str(fake_home / 'canary.txt')!r}).unlink()",
        f"open({str(fake_home / 'canary.txt')!r}, 'w').write('overwritten')",
        f"open({str(outside)!r}, 'w').write('escaped')",
        f"import os\nfd = os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})",
    ]
    for r in run_programs(programs, FAST, workers=2):
        assert not r.passed, r
    assert _snapshot(fake_home) == before
    assert not outside.exists() and not (tmp_path / "newdir").exists()


def test_kernel_layer_blocks_writes_that_dodge_python_guards(fake_home, tmp_path, features):
    if not any(f.startswith("landlock") or f == "uid-per-sample" for f in features):
        pytest.skip("no kernel write protection available here")
    before = _snapshot(fake_home)
    # io.FileIO is the C-level file object: not routed through our open() guard
    r = run_program(f"import io\nio.FileIO({str(fake_home / 'canary.txt')!r}, 'w').write(b'x')", FAST)
    # refused (Landlock, file modes) or not even there (the private filesystem view)
    assert not r.passed and ("Permission" in r.detail or "FileNotFound" in r.detail), r.detail
    r = run_program(f"import io\nio.FileIO({str(tmp_path / 'new.txt')!r}, 'w').write(b'x')", FAST)
    assert not r.passed and not (tmp_path / "new.txt").exists()
    assert _snapshot(fake_home) == before


def test_no_network(features):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port, hits, done = server.getsockname()[1], [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                conn, _ = server.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        r1 = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", FAST)
        # _socket reloaded from its .so file, past the import guard: the kernel layers must hold
        r2 = run_program(_LOAD_EXTENSION.format(name="_socket") + (
            "s = m.socket(m.AF_INET, m.SOCK_STREAM)\n"
            "s.settimeout(1)\n"
            f"s.connect(('127.0.0.1', {port}))\n"), FAST)
    finally:
        done.set()
        t.join()
        server.close()
    assert not r1.passed and "socket" in r1.detail
    if "netns" not in features and not any(f.startswith("landlock-abi") and "tcp" in f for f in features):
        pytest.skip("no kernel network layer here; only the import guard (checked above) applies")
    assert not r2.passed and "m.socket" not in r2.detail  # it got a socket object, connect failed
    assert not hits


def test_output_is_capped():
    r = run_program("print('x' * (5 << 20))", Limits(timeout_s=3.0, output_bytes=1 << 16))
    assert not r.passed and len(r.stdout) <= 1 << 16


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="bad sandbox limits"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_programs(["pass"], workers=0)


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    """All 164 canonical solutions pass through our executor; the same 164 problems with an
    empty body (the prompt alone: a docstring-only function) all fail. One pool for both."""
    from flylora.tasks import get_task

    task = get_task("humaneval")
    rows = task.load("test").rows
    start = time.monotonic()
    res = task.score_samples(rows + rows, [[p["canonical_solution"]] for p in rows] + [[""]] * len(rows),
                             ks=(1,), workers=2)
    wall = time.monotonic() - start
    passed = [r["num_correct"] for r in res.records]
    assert passed[:164] == [1] * 164, [r["task_id"] for r in res.records[:164] if not r["num_correct"]]
    assert passed[164:] == [0] * 164
    assert wall < 180  # ~10 s on 2 idle cores; generous for a loaded CI box


def test_pass_bodies_fail():
    from flylora.tasks import get_task

    task = get_task("humaneval")
    rows = task.load("test", limit=20).rows
    assert task.score_samples(rows, [["    pass\n"]] * 20, ks=(1,)).metrics["pass@1"] == 0.0


def test_pass_at_k_from_several_samples():
    from flylora.tasks import get_task

    task = get_task("humaneval")
    rows = task.load("test", limit=2).rows
    # problem 0: 2 of 4 correct; problem 1: 0 of 4
    comps = [[rows[0]["canonical_solution"]] * 2 + ["    pass\n"] * 2, ["    pass\n"] * 4]
    res = task.score_samples(rows, comps, ks=(1, 2, 5))
    assert res.metrics["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    assert res.metrics["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2)
    assert "pass@5" not in res.metrics
    assert json.dumps(res.records)  # JSON-serialisable for the outputs file


def test_values_cross_the_checker_boundary_with_their_types():
    """The checker sees exactly the value the sandboxed function returned: a tuple is not a
    list, True is not 1, and non-plain values (a generator) fail instead of crossing."""
    from flylora.execution import Check

    test = ("import math\n"
            "def check(c):\n"
            "    for v in [(1, 2), [1, (2,)], True, 1, 1.5, float('inf'), None, 'é', b'\\x00', {1, 2},\n"
            "              frozenset({3}), {'a': [1, (2,)]}, 2 ** 100, 1 + 2j]:\n"
            "        r = c(v)\n"
            "        assert r == v and type(r) is type(v), (v, r)\n"
            "    assert math.isnan(c(float('nan')))\n"
            "    assert c(x=[1]) == [1]\n")
    r = run_program("def f(x):\n    return x\n", FAST, Check(test, "f"))
    assert r.passed, r.detail
    r = run_program("def f(x):\n    return (y for y in x)\n", FAST, Check(test, "f"))
    assert not r.passed and "cannot pass a generator" in r.detail, r.detail
