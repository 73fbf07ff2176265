"""Nothing lost: the one place every flylora writer goes through.

- `atomic_write_text` / `atomic_dir`: write to a hidden temp name next to the target, fsync the
  data (and the folder entry), then `os.replace`: a reader, a kill or a power loss never leaves a
  half-written or empty file under the final name. Temp names carry the writer's pid
  and host (`.NAME.tmp-PID-HOST-XXXX`), so `clean_stale_temps` can remove those of dead writers.
- Ownership: a folder is *ours* when it holds the marker file `.flylora` (written into every
  folder flylora creates) or one of our result files (run.json, merge.json, results.json with
  our version key). `remove_ours` deletes only such folders; anything else is refused in one
  line naming the folder, so `overwrite` can never delete a user's own files.
- `dir_lock`: an exclusive, non-blocking `flock` on `.NAME.lock` beside a folder. The second
  writer is refused in one line; the kernel drops the lock when its holder dies, so a crash
  never leaves a stale lock behind.
- `unique_dir`: `mkdir` without exist_ok is atomic, so two runs started in the same second still
  get two folders (`NAME`, `NAME-2`, ...).
- `disk_full_error`: turns a failed write on a full disk (torch and safetensors raise RuntimeError
  there, not OSError) into one OSError line naming the folder.

Only the standard library here: the CLI imports this before anything heavy.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

MARKER = ".flylora"
# our result files and the version key that proves we wrote them
SIGNATURES = {"run.json": ("flylora_run_version",), "merge.json": ("flylora_merge_version",),
              "results.json": ("flylora_eval_version", "flylora_results_version", "flylora_sweep_version")}
STALE_AFTER_S = 24 * 3600  # a temp whose pid cannot be checked (another host) is stale after this


class OutputDirError(ValueError):
    """An output folder flylora must not write into or delete (one line, exit 2)."""


class LockedError(OutputDirError):
    """Another flylora process holds the folder."""


# ------------------------------------------------------------------------------ ownership
def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark `folder` as created by flylora (`kind`: train, eval, merge, experiment, ...)."""
    folder = Path(folder)
    path = folder / MARKER
    if not path.exists():
        atomic_write_text(path, json.dumps({"flylora": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "pid": os.getpid(), "host": socket.gethostname()}) + "\n")


EXPERIMENT_PARTS = ("train", "eval", "merge", "eval_merged")  # subfolders of an experiment folder


def is_ours(folder: str | os.PathLike) -> bool:
    """True when flylora wrote `folder`: our marker, a result file with our version key, or (from a
    version before the marker) an interrupted run folder (our recipe.yaml + checkpoints/)."""
    return _is_ours_here(Path(folder))


def _legacy_experiment(folder: Path) -> bool:
    """An interrupted experiment folder of a version before the marker: our run/eval folders
    below train/, eval/, ... Enough to write into it (resume), never to delete it."""
    for part in EXPERIMENT_PARTS:
        if (folder / part).is_dir():
            for seen, (root, dirs, _) in enumerate(os.walk(folder / part)):
                if seen > 2000:
                    break
                if _is_ours_here(Path(root)):
                    return True
    return False


def _is_ours_here(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    for name, keys in SIGNATURES.items():
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and any(k in data for k in keys):
                return True
    # an interrupted `flylora train` run of a version before the marker: recipe.yaml + checkpoints/
    recipe = folder / "recipe.yaml"
    if recipe.is_file() and (folder / "checkpoints").is_dir():
        try:
            import yaml

            data = yaml.safe_load(recipe.read_text())
        except Exception:  # noqa: BLE001  (unreadable: not known to be ours)
            return False
        return isinstance(data, dict) and {"name", "model", "method", "data", "train", "output"} <= set(data)
    return False


def is_empty_dir(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not any(folder.iterdir())


def check_writable_target(path: str | os.PathLike, what: str, deleting: bool = False) -> Path:
    """`path` may be written into (or, `deleting`, removed): missing, an empty folder, or a folder
    of ours. A file, or a folder of someone else's files, is refused in one line naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{what} {str(path)!r} is a file, not a folder; choose a folder path")
    if path.is_dir() and not is_empty_dir(path) and not is_ours(path) \
            and (deleting or not _legacy_experiment(path)):
        raise OutputDirError(f"{what} {str(path)!r} already exists and holds files flylora did not write "
                             f"(no {MARKER} marker); refusing to touch it: choose another folder")
    return path


def remove_ours(path: str | os.PathLike, what: str) -> None:
    """Delete `path` only if flylora wrote it (or it is empty); otherwise refuse in one line."""
    path = check_writable_target(path, what, deleting=True)
    if path.exists():
        shutil.rmtree(path)


def ensure_dir(path: str | os.PathLike, what: str, kind: str | None = None) -> Path:
    """Create `path` (and parents) and check we can write there; one line when we cannot
    (a file in the way, read-only, no space). `kind`: also write our marker."""
    path = check_writable_target(path, what)
    # a legacy experiment folder may be written into, but it does not become "ours" to delete
    markable = not path.exists() or is_empty_dir(path) or is_ours(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".flylora-probe-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("x")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"{what} {str(path)!r} is not writable ({e.strerror or e})") from None
    if kind is not None and markable:
        write_marker(path, kind)
    return path


# ------------------------------------------------------------------------------ atomic writes
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _host_tag() -> str:
    import hashlib

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_prefix(name: str, tag: str = "tmp") -> str:
    # pid and host: clean_stale_temps may only judge a writer of this machine by its pid
    return f".{name}.{tag}-{os.getpid()}-{_host_tag()}-"


def disk_full_error(exc: BaseException, folder: str | os.PathLike) -> OSError | None:
    """An ENOSPC OSError naming `folder` when `exc` was (most likely) caused by a full disk."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, "no space left on device while writing", str(folder))
    text = str(exc).lower()
    free = None
    with contextlib.suppress(OSError):
        p = Path(folder)
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p).free
    if "no space left" in text or ("write" in text and free is not None and free < (1 << 20)):
        return OSError(errno.ENOSPC, "no space left on device while writing", str(folder))
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a fsynced temp file and os.replace."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a fsynced temp file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)  # a kill mid-write left one of ours here
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = disk_full_error(e, path.parent) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, data, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str, **kwargs) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_dir(out_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
               kind: str | None = None, what: str = "output folder") -> Path:
    """Run `write(tmp)` in a temp folder next to `out_dir`, fsync it, then move it into place, so
    a reader never sees a half-written folder. An existing `out_dir` is replaced only with
    `overwrite`, and only when it is ours (or empty). `kind`: also write our marker into it."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputDirError(f"{what} {str(out)!r} already exists; pass overwrite to replace it")
    check_writable_target(out, what, deleting=True)  # replacing it deletes the old one
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)  # what killed writers left beside it (up to a model's size each)
    clean_stale_temps(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give it a normal folder's mode
    old = None
    try:
        write(tmp)
        if kind is not None:
            write_marker(tmp, kind)
        _fsync_tree(tmp)
        if out.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name, "old"), dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the previous version back
        full = disk_full_error(e, out.parent) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep it
    return True


def clean_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove our temp files/folders (`.NAME.tmp-PID-HOST-*`, `.NAME.old-PID-HOST-*`) in `folder`
    whose writer is no longer running (or, for a pid we cannot check, older than a day). `name`:
    only those of that target, plus its temps from older flylora versions (no pid in the name,
    removed once a day old); None: every target's. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        n = p.name
        if not n.startswith("."):
            continue
        for tag in (".tmp-", ".old-"):
            head, sep, tail = n[1:].rpartition(tag)
            if sep and (name is None or head == name):
                break
        else:
            continue
        parts = tail.split("-")
        legacy = len(parts) < 3 or not parts[0].isdigit() or len(parts[1]) != 6  # older flylora: no pid/host
        if legacy and name is None:
            continue  # without our pid/host tag only a temp of the named target is known to be ours
        pid, host = (-1, "") if legacy else (int(parts[0]), parts[1])
        if host == _host_tag() and pid == os.getpid():
            continue  # our own, in progress
        if legacy or host != _host_tag() or _pid_alive(pid):
            try:  # a live pid (or another machine's writer): only once it is clearly abandoned
                if time.time() - p.lstat().st_mtime < STALE_AFTER_S:
                    continue
            except OSError:
                continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------ locks and names
def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (file `.NAME.lock` beside it) for the `with` block; a
    second holder is refused at once with LockedError. Without fcntl (Windows): no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield Path(folder)
        return
    path = lock_path(folder)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputDirError(f"{what} {str(folder)!r} is not writable (cannot create its lock file "
                                 f"{str(path)!r}: {e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
            os.close(fd)
            raise LockedError(f"{what} {str(folder)!r} is in use by another flylora process{holder}; "
                              "wait for it to finish or choose another folder") from None
        # the previous holder may have unlinked the file between our open and flock: retry then
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield Path(folder)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def unique_dir(base: str | os.PathLike) -> Path:
    """Create and return `base`, or `base-2`, `base-3`, ... if taken (atomic: mkdir fails if it
    exists, so concurrent callers never share a folder)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OutputDirError(f"no free folder name next to {str(base)!r}")
