"""User prompt datasets (llm.data): every format reads the same rows through the real ``datasets`` library,
conversations split into prompt + earlier turns, the seeded epoch order is a pure function of (seed, step, n),
drop_long filters, and each bad input is refused with a one-line ValueError that names the file (and row)."""

from __future__ import annotations

import gc
import json
import os
import pickle
import socket

import datasets
import numpy as np
import pytest
from datasets.table import MemoryMappedTable

from llm.data import PromptDataset, PromptRow

PLAIN = [
    {"prompt": "Write a word.", "answer": "cat", "level": 1, "privileged_context": "the answer is cat"},
    {"prompt": "Write a number.", "answer": "7", "level": 2, "privileged_context": None},
    {"prompt": "Name a colour.", "answer": "red", "level": 3, "privileged_context": "think of apples"},
]
EXPECTED = [PromptRow(prompt=r["prompt"], columns={"answer": r["answer"], "level": r["level"]},
                      context=r["privileged_context"], index=i) for i, r in enumerate(PLAIN)]
CONVERSATIONS = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "answer": "a"},
    {"prompt": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                {"role": "user", "content": "Two?"}], "answer": "b"},
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails: loading must need none."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write(rows: list[dict], path, fmt: str) -> str:
    """``rows`` written with the ``datasets`` writers as ``fmt`` under ``path``; returns what to load."""
    ds = datasets.Dataset.from_list(rows)
    if fmt in ("jsonl", "json"):
        ds.to_json(str(path / f"data.{fmt}"))
    elif fmt == "parquet":
        ds.to_parquet(str(path / "data.parquet"))
    elif fmt == "csv":
        ds.to_csv(str(path / "data.csv"), index=False)
    elif fmt == "disk":
        ds.save_to_disk(str(path / "disk"))
        return str(path / "disk")
    elif fmt == "diskdict":
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path / "diskdict"))
        return str(path / "diskdict")
    return str(path / f"data.{fmt}")


def _write_empty_parquet(path) -> str:
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(path / "none.parquet"))
    return str(path / "none.parquet")


def _jsonl(path, rows: list[dict], name: str = "data.jsonl") -> str:
    """``rows`` as JSON lines written by hand (for rows ``Dataset.from_list`` cannot build: mixed types)."""
    target = path / name
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(target)


# ----------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "disk", "diskdict"])
def test_each_format_loads_the_same_rows_memory_mapped_without_network(tmp_path, fmt, no_network):
    ds = PromptDataset.load(_write(PLAIN, tmp_path, fmt))
    assert len(ds) == ds.num_file_rows == 3
    assert ds.column_names == ["answer", "level"]
    assert ds.rows(0, 3) == EXPECTED
    assert ds.row(1) == EXPECTED[1]
    assert ds.rows(1, 99) == EXPECTED[1:]  # stop is clipped
    assert isinstance(ds._table.data, MemoryMappedTable)  # the rows stay in Arrow on disk, not in Python lists
    assert ds._kept.dtype == np.int32  # 4 bytes a row below 2**31 rows


def test_a_file_is_converted_in_a_private_temporary_directory_removed_with_the_dataset(tmp_path):
    ds = PromptDataset.load(_write(PLAIN, tmp_path, "jsonl"))
    cache = ds._cache.name
    files = [f["filename"] for f in ds._table.cache_files]
    assert files and all(f.startswith(cache) for f in files)
    assert not any(f.startswith(str(datasets.config.HF_DATASETS_CACHE)) for f in files)
    del ds
    gc.collect()
    assert not os.path.exists(cache)


def test_cache_dir_and_glob_characters_in_the_name(tmp_path):
    path = tmp_path / "we[i]rd*?.parquet"
    datasets.Dataset.from_list(PLAIN).to_parquet(str(path))
    ds = PromptDataset.load(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds.rows(0, 3) == EXPECTED and ds._cache is None
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in ds._table.cache_files)


def test_dataset_dict_split(tmp_path):
    path = _write(PLAIN, tmp_path, "diskdict")
    assert len(PromptDataset.load(path)) == 3  # "train" by default
    assert PromptDataset.load(path, split="test").rows(0, 5) == EXPECTED[:1]
    empty = datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN),
                                  "test": datasets.Dataset.from_dict({"prompt": []})})
    empty.save_to_disk(str(tmp_path / "withempty"))
    assert len(PromptDataset.load(str(tmp_path / "withempty"))) == 3
    _refused(r"withempty split 'test' has no rows", tmp_path / "withempty", split="test")


# ----------------------------------------------------------------------------------------------- rows
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_conversation_prompts(tmp_path, fmt):
    ds = PromptDataset.load(_write(CONVERSATIONS, tmp_path, fmt))
    first, second = ds.rows(0, 2)
    assert first.prompt == "Hi?" and first.messages == ({"role": "system", "content": "Be brief."},)
    assert second.prompt == "Two?"
    assert second.messages == ({"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"})
    assert first.columns == {"answer": "a"} and first.context is None


def test_strings_and_conversations_mixed_in_one_file_and_extra_message_keys_dropped(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "plain"},
                             {"prompt": [{"role": "system", "content": "s", "name": "x"},
                                         {"role": "user", "content": "u"}]}])
    plain, conv = PromptDataset.load(path).rows(0, 2)
    assert plain == PromptRow(prompt="plain", index=0)
    assert conv.prompt == "u" and conv.messages == ({"role": "system", "content": "s"},)


def test_columns_handed_through_with_their_types_and_a_named_context_column(tmp_path):
    rows = [{"prompt": "p", "hint": "h0", "ids": [1, 2], "meta": {"k": 1.5}, "ok": True, "privileged_context": "x"},
            {"prompt": "q", "hint": "  ", "ids": [], "meta": {"k": 2.0}, "ok": False, "privileged_context": "y"}]
    ds = PromptDataset.load(_write(rows, tmp_path, "parquet"), context_column="hint")
    assert ds.column_names == ["ids", "meta", "ok", "privileged_context"]
    first, second = ds.rows(0, 2)
    assert first.context == "h0" and second.context is None  # blank context counts as none
    assert first.columns == {"ids": [1, 2], "meta": {"k": 1.5}, "ok": True, "privileged_context": "x"}
    assert second.columns["ids"] == [] and second.columns["ok"] is False
    assert pickle.loads(pickle.dumps(first)) == first  # rows cross processes (accelerate gathers pickle them)


def test_a_saved_format_is_ignored(tmp_path):
    ds = datasets.Dataset.from_list(PLAIN).with_format("numpy")
    ds.save_to_disk(str(tmp_path / "numpy"))
    rows = PromptDataset.load(str(tmp_path / "numpy")).rows(0, 3)
    assert rows == EXPECTED
    assert type(rows[0].prompt) is str and type(rows[0].columns["level"]) is int  # not numpy scalars


def test_no_context_column(tmp_path):
    ds = PromptDataset.load(_write([{"prompt": "a", "answer": 1}], tmp_path, "jsonl"))
    assert ds.row(0) == PromptRow(prompt="a", columns={"answer": 1}, context=None, index=0)


# ----------------------------------------------------------------------------------------------- order
@pytest.fixture(scope="module")
def ten(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ten")
    return _write([{"prompt": f"p{i}", "k": i} for i in range(10)], path, "parquet")


def _indices(rows: list[PromptRow]) -> list[int]:
    return [r.index for r in rows]


def test_every_row_once_per_epoch_and_steps_span_epochs(ten):
    ds = PromptDataset.load(ten)
    walk = [i for s in range(10) for i in _indices(ds.rows_for_step(7, s, 4))]  # 40 positions = 4 epochs
    epochs = [walk[e * 10:(e + 1) * 10] for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # each epoch reshuffled; 4 equal orders of 10! is ~1e-20
    assert walk[:10] == list(np.random.default_rng([7, 0]).permutation(10))  # the documented order
    big = _indices(ds.rows_for_step(7, 1, 25))  # positions 25..49 of the concatenated epochs
    assert big == walk[25:40] + list(np.random.default_rng([7, 4]).permutation(10))
    assert ds.position(2, 4) == {"epoch": 0, "index": 8} and ds.position(3, 4) == {"epoch": 1, "index": 2}


def test_order_is_a_pure_function_of_seed_step_n(ten):
    seq = PromptDataset.load(ten)
    run = [_indices(seq.rows_for_step(3, s, 3)) for s in range(12)]
    for s in (0, 5, 11, 7):  # a fresh dataset (a resumed run) computes step s alone
        assert _indices(PromptDataset.load(ten).rows_for_step(3, s, 3)) == run[s]
    assert run == [_indices(seq.rows_for_step(3, s, 3)) for s in range(12)]  # same seed: same rows again
    other = [_indices(seq.rows_for_step(4, s, 3)) for s in range(12)]
    assert other != run  # another seed: another order (equal by chance with probability (1/10!)^3)
    assert sorted(other[0] + other[1] + other[2] + other[3][:1]) == list(range(10))


# ----------------------------------------------------------------------------------------------- drop_long
def test_drop_long_counts_batches_and_order(ten):
    ds = PromptDataset.load(ten)
    seen = []

    def count(rows: list[PromptRow]) -> list[int]:
        seen.append(len(rows))
        return [r.columns["k"] for r in rows]  # "length" = k, so rows with k <= 6 are kept

    assert ds.drop_long(count, 6, batch_size=4) == 3
    assert seen == [4, 4, 2]
    assert len(ds) == 7 and ds.num_file_rows == 10
    assert _indices(ds.rows(0, 10)) == list(range(7))
    epoch = _indices(ds.rows_for_step(0, 0, 7))
    assert sorted(epoch) == list(range(7))
    assert epoch == [int(i) for i in np.random.default_rng([0, 0]).permutation(7)]  # kept row j is file row j here
    assert ds.drop_long(count, 6) == 0
    with pytest.raises(ValueError, match=r"all 7 prompts of .*data.parquet are longer than 8 tokens; raise "
                                         r"training.max_prompt_length"):
        ds.drop_long(lambda rows: [9] * len(rows), 8)
    assert len(ds) == 7  # a refused drop keeps the rows
    with pytest.raises(ValueError, match="count_tokens returned 1 counts for 7 prompts"):
        ds.drop_long(lambda rows: [1], 5)


# ----------------------------------------------------------------------------------------------- bad input
def _refused(match: str, path, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        PromptDataset.load(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(kwargs.get("field_name", "task.dataset") + ": ")
    return message


def test_bad_paths_and_formats(tmp_path):
    _refused(r"nope.jsonl does not exist; give a .jsonl/.json/.parquet/.csv file", tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hi\n")
    msg = _refused(r"unsupported file type '.txt'; allowed: .jsonl, .json, .parquet, .csv files", tmp_path / "data.txt")
    assert "data.txt" in msg
    (tmp_path / "plain").mkdir()
    _refused(r"plain is a directory but not one written by Dataset.save_to_disk", tmp_path / "plain")
    (tmp_path / "empty.jsonl").write_text("")
    _refused(r"empty.jsonl is empty", tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("prompt,answer\n")
    _refused(r"header.csv has no rows", tmp_path / "header.csv")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    _refused(r"blank.jsonl has no rows", tmp_path / "blank.jsonl")
    _refused(r"none.parquet has no rows", _write_empty_parquet(tmp_path))
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "emptydisk"))
    _refused(r"emptydisk has no rows", tmp_path / "emptydisk")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    _refused(r"broken.jsonl: could not read it as json lines: ", tmp_path / "broken.jsonl")
    _write([{"question": "q", "answer": "a"}], tmp_path, "parquet")
    _refused(r"data.parquet has no 'prompt' column; its columns: question, answer", tmp_path / "data.parquet",
             field_name="eval.dataset")


def test_bad_splits(tmp_path):
    _refused(r"split='train' given for a file; splits only apply to DatasetDict.save_to_disk",
             _write(PLAIN, tmp_path, "jsonl"), split="train")
    _refused(r"has no split 'validation'; its splits: train, test", _write(PLAIN, tmp_path, "diskdict"),
             split="validation")
    _refused(r"split='train' given for a Dataset.save_to_disk directory", _write(PLAIN, tmp_path, "disk"),
             split="train")


@pytest.mark.parametrize("prompt, match", [
    (5, r"row 1 \(counting from 0\): prompt is int; a prompt is a non-empty string or a conversation"),
    (None, r"row 1 \(counting from 0\): prompt is null"),
    ([], r"row 1 \(counting from 0\): prompt is list \(an empty list\)"),
    ("", r"row 1 \(counting from 0\): the prompt is empty"),
    ("   ", r"row 1 \(counting from 0\): the prompt is empty"),
    ([{"role": "user", "content": ""}], r"row 1 \(counting from 0\): the prompt's last user message is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     r"row 1 \(counting from 0\): the conversation's last message has role 'assistant'; it must be 'user'"),
    ([{"role": "user"}], r"row 1 \(counting from 0\): prompt message 0 is not \{'role': str, 'content': str\} "
                         r"\(got role=str, content=null\)"),
    (["hi"], r"prompt message 0 is not \{'role': str, 'content': str\} \(got str\)"),
])
def test_bad_prompts_name_the_row(tmp_path, prompt, match):
    ds = PromptDataset.load(_jsonl(tmp_path, [{"prompt": "fine"}, {"prompt": prompt}]))  # schema is fine at load
    assert ds.row(0).prompt == "fine"
    for read in (lambda: ds.row(1), lambda: ds.rows(0, 2), lambda: ds.rows_for_step(0, 0, 2),
                 lambda: ds.drop_long(lambda rows: [1] * len(rows), 10)):
        with pytest.raises(ValueError, match=match) as info:
            read()
        assert "\n" not in str(info.value) and "data.jsonl row 1" in str(info.value)


def test_bad_context_values(tmp_path):
    ds = PromptDataset.load(_jsonl(tmp_path, [{"prompt": "a", "privileged_context": 3}]))
    with pytest.raises(ValueError, match=r"data.jsonl row 0 \(counting from 0\): privileged_context=3 is int; "
                                         r"it must be a string or null"):
        ds.row(0)
    _refused(r"context_column='prompt' must be a column name other than 'prompt'", tmp_path / "data.jsonl",
             context_column="prompt")


def test_bad_arguments(ten):
    ds = PromptDataset.load(ten)
    for call, match in [(lambda: ds.row(10), r"row 10 is out of range; .* has 10 rows"),
                        (lambda: ds.rows(3, 2), r"needs start <= stop"),
                        (lambda: ds.rows_for_step(-1, 0, 2), r"seed=-1 must be a non-negative integer"),
                        (lambda: ds.rows_for_step(0, -1, 2), r"step=-1 must be an integer >= 0"),
                        (lambda: ds.rows_for_step(0, 0, 0), r"n=0 must be an integer >= 1"),
                        (lambda: ds.drop_long(lambda r: [], 0), r"max_tokens=0 must be a positive integer")]:
        with pytest.raises(ValueError, match=match):
            call()
