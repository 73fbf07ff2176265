"""Nothing lost (issue 14): the CLI never deletes what it did not write, recovers from a partial
checkpoint or a crash before run.json exactly, refuses NaN/truncated adapters in every command,
reports every expected error in one line (exit 2, no traceback), locks run folders, keeps the
finished tasks of an interrupted eval (exit 130), and writes atomically (fsync, then rename,
stale temps of dead writers cleaned)."""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flylora.cli import COMMANDS
from pipeline_child import tiny_model_dir, tiny_recipe

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Run A, uninterrupted: 4 steps, checkpoints at 2 and 4 (carved-train SST-2 rows)."""
    from flylora.pipeline.train import train

    recipe = tiny_recipe(model_dir, str(tmp_path_factory.mktemp("ref") / "a"), train={"save_steps": 2})
    return recipe, train(recipe)


def _cli(argv, capsys):
    """(exit code, stderr lines) of one in-process `flylora` call."""
    from flylora.cli import main

    rc = main([str(a) for a in argv])
    # progress bars (transformers' "Loading weights") are not messages
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not (line.startswith("Loading weights") and "it/s]" in line)]
    return rc, err


def _one_line(rc, err, *needles, code=2):
    assert rc == code, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _copy_run(src: Path, dst: Path, recipe: dict) -> dict:
    shutil.copytree(src, dst)
    return {**recipe, "output": {**recipe["output"], "dir": str(dst)}}


def _write_recipe(tmp_path, recipe) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _assert_same_adapter(a: Path, b: Path):
    ta, tb = load_file(str(a / "adapter" / ADAPTER)), load_file(str(b / "adapter" / ADAPTER))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6), k


# ------------------------------------------------------------------------------ 1. foreign folders
def test_overwrite_never_deletes_a_folder_flylora_did_not_write(model_dir, reference, tmp_path, capsys):
    """output.overwrite / merge --overwrite / eval --out / an experiment's output_dir pointed at a
    folder of the user's own files: refused in one line naming it, every file intact."""
    mine = tmp_path / "my-thesis"
    (mine / "chapter1").mkdir(parents=True)
    (mine / "notes.txt").write_text("years of work")
    (mine / "chapter1" / "draft.tex").write_text("\\section{}")
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))

    recipe = tiny_recipe(model_dir, str(mine), output={"overwrite": True})
    rc, err = _cli(["train", _write_recipe(tmp_path, recipe)], capsys)
    _one_line(rc, err, "flylora train: error: output.dir", str(mine), "flylora did not write")
    _, run_a = reference
    rc, err = _cli(["merge", run_a, "--method", "weight_average", "--out", mine, "--overwrite"], capsys)
    _one_line(rc, err, "flylora merge: error: output folder", str(mine), "flylora did not write")
    rc, err = _cli(["eval", "-m", model_dir, "--task", "glue:sst2", "--limit", "1", "--out", mine], capsys)
    _one_line(rc, err, "flylora eval: error: --out folder", str(mine))

    from flylora.pipeline.experiment import run_experiment
    from flylora.fsutil import OutputDirError

    spec = {"name": "x", "recipe": tiny_recipe(model_dir, "unused"), "methods": {"fly": {}},
            "tasks": ["glue:sst2"], "output_dir": str(mine)}
    with pytest.raises(OutputDirError, match="flylora did not write"):
        run_experiment(spec, progress=False)
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
    assert (mine / "notes.txt").read_text() == "years of work"

    # a folder of ours is replaced as asked
    from flylora.fsutil import remove_ours

    ours = tmp_path / "ours"
    shutil.copytree(run_a, ours)
    remove_ours(ours, "output.dir")
    assert not ours.exists()


# ------------------------------------------------------------------------------ 2. checkpoints
def test_partial_checkpoint_is_skipped_and_the_rerun_equals_the_uninterrupted_run(reference, tmp_path, capsys):
    """checkpoint-4 cut half-way (no trainer_state.json, weights truncated, as a kill -9 or a full
    disk leaves it) and no final adapter: `resume: auto` skips it in one line, resumes from
    checkpoint-2 and ends on run A's adapter."""
    from flylora.pipeline.train import train

    recipe, run_a = reference
    b = _copy_run(run_a, tmp_path / "b", recipe)
    run_b = Path(b["output"]["dir"])
    (run_b / "run.json").unlink()
    shutil.rmtree(run_b / "adapter")
    ck4 = run_b / "checkpoints" / "checkpoint-4"
    (ck4 / "trainer_state.json").unlink()
    (ck4 / "flylora-complete.json").unlink()
    data = (ck4 / ADAPTER).read_bytes()
    (ck4 / ADAPTER).write_bytes(data[: len(data) // 2])

    train(b)
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint {ck4} (no trainer_state.json); resuming from " \
           f"{run_b / 'checkpoints' / 'checkpoint-2'}" in err
    info = json.loads((run_b / "run.json").read_text())
    assert info["train"]["resumed_from"].endswith("checkpoint-2") and info["train"]["global_step"] == 4
    _assert_same_adapter(run_a, run_b)


def test_crash_between_final_adapter_and_run_json_takes_no_extra_step(reference, tmp_path, capsys):
    """Before the fix the re-run resumed from checkpoint-4 and the Trainer took a 5th step of 4."""
    from flylora.pipeline.train import train

    recipe, run_a = reference
    c = _copy_run(run_a, tmp_path / "c", recipe)
    run_c = Path(c["output"]["dir"])
    (run_c / "run.json").unlink()
    train(c)
    assert "already holds the end of training (global_step 4 of 4)" in capsys.readouterr().out
    info = json.loads((run_c / "run.json").read_text())
    assert info["train"]["global_step"] == 4 and info["train"]["resumed_from"].endswith("checkpoint-4")
    _assert_same_adapter(run_a, run_c)


# ------------------------------------------------------------------------------ 3. corrupt adapters
def test_nan_and_truncated_adapters_are_refused_by_every_command(model_dir, reference, tmp_path, capsys):
    from flylora import AdapterLoadError, load_adapter
    from flylora.models import load_model

    _, run_a = reference
    nan_dir, cut_dir = tmp_path / "nan", tmp_path / "cut"
    shutil.copytree(run_a / "adapter", nan_dir)
    shutil.copytree(run_a / "adapter", cut_dir)
    tensors = load_file(str(nan_dir / ADAPTER))
    bad = sorted(k for k in tensors if k.endswith("flylora_B"))[0]
    tensors[bad][0, 0] = float("nan")
    save_file(tensors, str(nan_dir / ADAPTER), metadata={"format": "pt"})
    data = (cut_dir / ADAPTER).read_bytes()
    (cut_dir / ADAPTER).write_bytes(data[: len(data) - 100])

    for folder, needles in ((nan_dir, [f"tensor {bad!r} has 1 non-finite value(s)"]),
                            (cut_dir, ["are corrupt or truncated"])):
        weights = str(folder / ADAPTER)
        rc, err = _cli(["eval", "-m", model_dir, "-a", folder, "--task", "glue:sst2", "--split", "carved-test",
                        "--limit", "1", "--max-new-tokens", "1", "--out", tmp_path / f"e-{folder.name}",
                        "--no-progress"], capsys)
        _one_line(rc, err, "flylora eval: error: adapter weights", weights, *needles)
        rc, err = _cli(["merge", folder, run_a, "--method", "weight_average", "--out",
                        tmp_path / f"m-{folder.name}"], capsys)
        _one_line(rc, err, "flylora merge: error: adapter weights", weights, *needles)
        assert not (tmp_path / f"m-{folder.name}").exists()
        with pytest.raises(AdapterLoadError) as e:
            load_adapter(load_model(model_dir), str(folder))
        assert weights in str(e.value) and all(n in str(e.value) for n in needles)


# ------------------------------------------------------------------------------ 4. one line each
def _unwritable(tmp_path) -> Path:
    """A folder path we cannot create: chmod 0500 (non-root) or /sys (root ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").write_text("x")
    except OSError:
        return ro / "out"
    target = Path("/sys/flylora-nothing-lost")
    try:
        target.mkdir()
    except OSError:
        return target / "out"
    target.rmdir()
    pytest.skip("no unwritable folder on this machine")


def test_expected_errors_are_one_line_exit_2_without_traceback(model_dir, reference, tmp_path, capsys):
    from flylora.fsutil import dir_lock

    _, run_a = reference
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    ro = _unwritable(tmp_path)
    eval_args = ["eval", "--task", "glue:sst2", "--limit", "1", "--max-new-tokens", "1", "--no-progress"]

    def train_rc(name, **sections):
        return _cli(["train", _write_recipe(tmp_path, tiny_recipe(model_dir, str(tmp_path / name), **sections))],
                    capsys)

    # a local model path that does not exist (was: "invalid hub repo id" and a 40-line traceback)
    rc, err = _cli([*eval_args, "-m", tmp_path / "no" / "model", "--out", tmp_path / "e1"], capsys)
    _one_line(rc, err, f"model path {str(tmp_path / 'no' / 'model')!r} does not exist")
    rc, err = train_rc("t1", model={"name_or_path": "./no-such-model/here"})
    _one_line(rc, err, "model path './no-such-model/here' does not exist")
    # the output folder is a file / read-only
    rc, err = train_rc("t2", output={"dir": str(a_file)})
    _one_line(rc, err, f"output.dir {str(a_file)!r} is a file, not a folder")
    rc, err = _cli([*eval_args, "-m", model_dir, "--out", a_file], capsys)
    _one_line(rc, err, f"--out folder {str(a_file)!r} is a file")
    rc, err = _cli(["merge", run_a, "--method", "weight_average", "--out", a_file], capsys)
    _one_line(rc, err, f"output folder {str(a_file)!r} is a file")
    rc, err = train_rc("t3", output={"dir": str(ro)})
    _one_line(rc, err, f"output.dir {str(ro)!r} is not writable")
    rc, err = _cli([*eval_args, "-m", model_dir, "--out", ro], capsys)
    _one_line(rc, err, f"--out folder {str(ro)!r} is not writable")
    # a YAML syntax error names the line and column
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: 1\n lr2: 2\n")
    rc, err = _cli(["train", bad], capsys)
    _one_line(rc, err, f"{bad}:4:2: invalid YAML: expected <block end>")
    # a run folder busy with another train: refused (was: both exit 0, the last writer wins)
    busy = tmp_path / "busy"
    with dir_lock(busy, "output.dir"):
        rc, err = train_rc("busy")
    _one_line(rc, err, f"output.dir {str(busy)!r} is in use by another flylora process (pid {os.getpid()})")
    assert not busy.exists()
    # silently ignored options
    rc, err = _cli([*eval_args[:-3], "--max-new-tokens", "0", "-m", model_dir], capsys)
    _one_line(rc, err, "max_new_tokens must be >= 1, got 0")
    rc, err = train_rc("t4", train={"save_total_limit": 0})
    _one_line(rc, err, "recipe.train.save_total_limit: must be >= 1 or null (keep all), got 0")
    rc, err = _cli(["merge", run_a, "--method", "weight_average", "--density", "0.3", "--out", tmp_path / "m"],
                   capsys)
    _one_line(rc, err, "--density does not apply to --method weight_average")
    # a full disk while writing: one line naming the folder, no temp left behind
    import flylora.fsutil as fsutil

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fsutil.os.fsync = full
    try:
        rc, err = _cli(["merge", run_a, "--method", "weight_average", "--out", tmp_path / "full" / "m"], capsys)
    finally:
        fsutil.os.fsync = real_fsync
    _one_line(rc, err, "flylora merge: error: no space left on device while writing", str(tmp_path / "full"))
    assert [p.name for p in (tmp_path / "full").iterdir()] == []
    # --debug shows the traceback instead
    from flylora.cli import main

    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        main(["--debug", *eval_args[:-3], "--max-new-tokens", "0", "-m", model_dir])


# ------------------------------------------------------------------------------ 5. Ctrl-C in eval
def test_sigint_during_a_two_task_eval_keeps_the_finished_task(model_dir, tmp_path, capsys, monkeypatch):
    import flylora.evaluation.evaluate as ev

    real, calls = ev.evaluate_task, []

    @functools.wraps(real)  # evaluate() checks its options against this signature
    def interrupted_on_the_second_task(task, *args, **kwargs):
        calls.append(task.name)
        if len(calls) == 2:  # a real SIGINT, delivered while the second task runs
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here, at once
        return real(task, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_task", interrupted_on_the_second_task)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain `flylora` process
    try:
        out = tmp_path / "ev"
        rc, err = _cli(["eval", "-m", model_dir, "--task", "glue:sst2,glue:mrpc", "--split", "carved-test",
                        "--limit", "2", "--max-new-tokens", "1", "--out", out, "--no-progress"], capsys)
    finally:
        signal.signal(signal.SIGINT, old)
    line = _one_line(rc, err, code=130)
    assert line == f"flylora eval: interrupted; kept 1 of 2 finished task result(s) (base/glue:sst2) in {out}/results.json"
    report = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in report["results"]] == ["glue:sst2"] and report["interrupted"] is True
    assert len((out / "outputs" / "base__glue-sst2.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------ 6. defaults
def test_carved_train_adapters_default_to_carved_test_and_default_outs_are_unique(model_dir, reference, tmp_path,
                                                                                 capsys, monkeypatch):
    from flylora.fsutil import unique_dir

    _, run_a = reference
    monkeypatch.chdir(tmp_path)
    rc = _cli(["eval", "-m", model_dir, "-a", run_a, "--task", "glue:sst2", "--limit", "2", "--max-new-tokens",
               "1", "--no-progress"], capsys)[0]
    assert rc == 0
    (out,) = list((tmp_path / "runs" / "eval").iterdir())
    assert json.loads((out / "results.json").read_text())["results"][0]["split"] == "carved-test"
    # two evals started in the same second: two folders (mkdir is atomic)
    assert unique_dir(out) == out.with_name(out.name + "-2") and unique_dir(out) == out.with_name(out.name + "-3")


# ------------------------------------------------------------------------------ 7. atomic writes
def test_atomic_writes_fsync_before_rename_and_clean_stale_temps(tmp_path, monkeypatch):
    import flylora.fsutil as fsutil

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = fsutil._host_tag()
    stale = tmp_path / f".adapter.tmp-{dead.pid}-{tag}-abc123"
    live = tmp_path / f".adapter.tmp-{os.getppid()}-{tag}-def456"  # a running writer: kept
    stale_other = tmp_path / f".merged.tmp-{dead.pid}-{tag}-ghi789"  # another target, writer dead too
    other = tmp_path / ".notes.tmp-1-x-y"  # no pid/host tag of ours, another name: not known to be ours
    for p in (stale, stale_other, live, other):
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"0" * 1024)

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)),
                                                            real_replace(a, b))[1])
    fsutil.atomic_dir(tmp_path / "adapter", lambda d: (d / "w.bin").write_bytes(b"1" * 10), kind="adapter")
    assert not stale.exists() and not stale_other.exists() and live.exists() and other.exists()
    assert events.index(("replace", "adapter")) > events.index("fsync")
    assert fsutil.is_ours(tmp_path / "adapter") and (tmp_path / "adapter" / "w.bin").read_bytes() == b"1" * 10

    events.clear()
    fsutil.atomic_write_text(tmp_path / "run.json", "{}\n")
    assert events[0] == "fsync" and events[1] == ("replace", "run.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.json")]


# ------------------------------------------------------------------------------ 8. --help
def test_top_level_help_is_whole_and_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom flylora.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try: main(['--help'])\n    except SystemExit: pass\n"
            "print(buf.getvalue())\nprint('HEAVY', sorted(m for m in ('torch', 'peft', 'transformers') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out
    text = " ".join(out.split())
    assert "train adapters from YAML recipes, evaluate, merge and report." in text
    assert "Run `flylora <command> --help` for a command's options." in text
    for name in ("demo", "eval", "train", "merge", "report", "bench"):
        assert f" {name} " in text


HEAVY = ("torch", "transformers", "peft", "datasets", "numpy")
_COMMAND_HELP = """
import contextlib, io, sys
from flylora.cli import COMMANDS, main
out = io.StringIO()
def call(argv):
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(argv)
        except SystemExit as e:
            return e.code
print("HELP", call([{cmd!r}, "--help"]))
if not getattr(sys.modules[COMMANDS[{cmd!r}][0]], "TAKES_REMAINDER", False):  # lm-eval passes unknown options on
    print("BAD OPTION", call([{cmd!r}, "--no-such-option"]))
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
print(out.getvalue())
"""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_and_argument_errors_import_nothing_heavy(command):
    """`flylora <command> --help` and an unknown option import the command's module, but not torch,
    transformers, peft, datasets or numpy: only `run` needs them."""
    code = _COMMAND_HELP.format(cmd=command, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HELP 0" in proc.stdout and f"usage: flylora {command}" in proc.stdout, proc.stdout[-2000:]
    if command != "lm-eval":
        assert "BAD OPTION 2" in proc.stdout, proc.stdout[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout.splitlines()[:3]


def test_lazy_import_flylora_still_registers_the_methods_with_peft():
    """`import flylora` no longer imports PEFT (that made --help slow), so registration happens when
    PEFT is imported, also after transformers' `find_spec("peft")` availability check."""
    code = ("import sys, importlib.util\nimport flylora\nassert 'peft' not in sys.modules\n"
            "importlib.util.find_spec('peft')\nimport transformers\n"
            "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
            "print('REGISTERED', all(t in M for t in ('FLYLORA', 'TOPLORA', 'MOELORA', 'LORA_FA')))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "REGISTERED True" in proc.stdout, proc.stderr[-2000:]
