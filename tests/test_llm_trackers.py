"""Trackers (``training.report_to``) and checkpoint rotation (``save_total_limit``), exercised for real:
TensorBoard event files read back with TensorBoard's own reader, W&B offline runs read back from their
transaction log with W&B's own record schema, checkpoints saved, rotated and loaded."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import llm.logging as logging_module
from llm.checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from llm.logging import REPORT_TO, MetricsLogger, check_report_to, read_metrics
from llm.teacher_weights import make_teacher, trainable_named_parameters

# Values logged at steps 1..3: two real numbers, and three kinds the trackers must skip (jsonl keeps them).
LOGGED = {s: {"loss": 1.0 / (3 * s), "reward": 0.1 * s, "note": "text", "flag": True, "bad": float("nan")} for s in (1, 2, 3)}


# -- check_report_to ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, words", [
    (["mlflow"], ["unknown tracker 'mlflow'", "jsonl, tensorboard, wandb"]),
    (["jsonl", "wandb", "jsonl"], ["'jsonl' is listed twice"]),
    ([], ["is empty", "jsonl, the default"]),
    ("wandb", ["must be a list"]),
    ([3], ["unknown tracker 3"]),
])
def test_check_report_to_refuses_bad_lists_in_one_line(bad, words):
    with pytest.raises(ValueError) as e:
        check_report_to(bad, "training.report_to")
    message = str(e.value)
    assert "\n" not in message and message.startswith("training.report_to")
    for w in words:
        assert w in message, message


def test_check_report_to_accepts_every_tracker_and_names_a_missing_package(monkeypatch):
    check_report_to(list(REPORT_TO))
    # A tracker whose package cannot be found: our own name table pointed at a package that does not exist
    # (the real find_spec answers; nothing of tensorboard or wandb is faked).
    monkeypatch.setitem(logging_module._PACKAGE, "wandb", "sdpo_lab_no_such_package")
    with pytest.raises(ValueError, match=r"needs the sdpo_lab_no_such_package package.*pip install 'sdpo-lab\[tracking\]'"):
        check_report_to(["jsonl", "wandb"])


# -- jsonl and TensorBoard ----------------------------------------------------------------------------
def _tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_values_and_a_resume_purges_later_steps(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"])
    for step, metrics in LOGGED.items():
        logger.log(step, metrics)
    logger.close()
    # TensorBoard stores a scalar as float32: the value read back is the float32 rounding of what was logged.
    expected = {k: [(s, float(np.float32(m[k]))) for s, m in LOGGED.items()] for k in ("loss", "reward")}
    assert _tensorboard_scalars(tmp_path / "tensorboard") == expected  # note/flag/bad (str, bool, NaN) skipped
    rows = read_metrics(tmp_path)  # metrics.jsonl is written although report_to does not name jsonl
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["note"] == "text" and rows[0]["bad"] is None

    resumed = MetricsLogger(tmp_path, report_to=["jsonl", "tensorboard"], resume_step=2)
    resumed.log(3, {"loss": 7.0, "reward": 8.0})
    resumed.log(4, {"loss": 9.0, "reward": 10.0})
    resumed.close()
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == expected["loss"][:2] + [(3, 7.0), (4, 9.0)]  # the old step 3 is purged
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, LOGGED[1]["loss"]), (2, LOGGED[2]["loss"]), (3, 7.0), (4, 9.0)]


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "out", enabled=False, report_to=["jsonl", "tensorboard", "wandb"])
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "out").exists() and logger.wandb_run is None


# -- W&B ----------------------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), parsed with W&B's own protobuf schema.

    The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by LevelDB-log framing: 32 KiB
    blocks of chunks, each ``crc32c (4) | length (2, little-endian) | type (1) | data`` with type 1 = a full
    record, 2/3/4 = first/middle/last piece of one; a block tail shorter than a chunk header is zero padding.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, records, pieces = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and kind in (1, 2, 3, 4), (pos, kind, length)
        pos += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    assert len(data) - pos < 7  # nothing but padding is left over
    return records


def _wandb_run(directory: Path) -> tuple[dict, dict[int, dict]]:
    """(run record fields, {step: history values}) of the W&B run directory ``directory``, without W&B's own
    entries (config ``_wandb``; history ``_step``, ``_runtime``, ``_timestamp``)."""
    (log,) = directory.glob("run-*.wandb")
    run, history = {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update if item.key != "_wandb"}
            run = {"id": record.run.run_id, "project": record.run.project, "name": record.run.display_name, "config": config}
        elif kind == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in values.items() if not k.startswith("_")}
    return run, history


@pytest.fixture
def sealed_home(tmp_path, monkeypatch):
    """An empty HOME and working directory, no XDG or W&B settings: whatever W&B writes outside the output
    directory would land in one of them. Yields (home, cwd)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in [k for k in os.environ if k.startswith(("WANDB_", "XDG_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)
    return home, cwd


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_wandb_offline_run_holds_the_values_stays_inside_output_dir_and_resumes_the_same_run(tmp_path, sealed_home):
    out = tmp_path / "out"
    before = _children()
    logger = MetricsLogger(out, report_to=["jsonl", "wandb"], run_name="trial", config={"method": "sdpo", "lr": 1e-5})
    assert _children() - before  # the W&B service runs as a child process while the run is open ...
    for step, metrics in LOGGED.items():
        logger.log(step, metrics)
    run_id = logger.wandb_id
    logger.close()
    assert _children() - before == set()  # ... and is gone once close() returns

    assert (out / "wandb_id").read_text().strip() == run_id
    (first,) = (out / "wandb").glob("offline-run-*")
    run, history = _wandb_run(first)
    assert run == {"id": run_id, "project": "sdpo-lab", "name": "trial", "config": {"method": "sdpo", "lr": 1e-5}}
    # JSON carries a float's shortest repr, which reads back to the same double: equality is exact.
    assert history == {s: {"loss": m["loss"], "reward": m["reward"]} for s, m in LOGGED.items()}
    home, cwd = sealed_home
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []  # nothing written outside the output dir

    resumed = MetricsLogger(out, report_to=["wandb"], resume_step=2)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    run, history = _wandb_run((out / "wandb" / "latest-run").resolve())
    assert run["id"] == run_id and history == {3: {"loss": 0.5}}
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]

    fresh = MetricsLogger(out, report_to=["wandb"])  # a run from step 0 is a new W&B run
    fresh.close()
    assert fresh.wandb_id != run_id and (out / "wandb_id").read_text().strip() == fresh.wandb_id
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == [] and _children() - before == set()


# -- checkpoint rotation ------------------------------------------------------------------------------
def _tiny_parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, optimizer, make_teacher("ema", 0.5, model)


def _train_step(model, optimizer, teacher) -> None:
    loss = model(torch.ones(4, 3)).square().sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    teacher.update(model)


def _save(out: Path, step: int, parts, limit):
    model, optimizer, teacher = parts
    return save_checkpoint(out, step, model=model, optimizer=optimizer, teacher=teacher,
                           trainer_state={"marker": step}, save_total_limit=limit)


def test_save_total_limit_keeps_the_newest_checkpoints_and_a_resume_still_loads(tmp_path):
    parts = _tiny_parts(0)
    partial = tmp_path / "checkpoints" / "step-000000"  # an incomplete directory (no state.pt): never touched
    partial.mkdir(parents=True)
    for step in (1, 2, 3, 4):
        _train_step(*parts)
        final = _save(tmp_path, step, parts, limit=2)
        assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step-{s:06d}" for s in range(max(1, step - 1), step + 1)]
        assert latest_checkpoint(tmp_path) == final
    assert partial.is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000000", "step-000003", "step-000004"]

    model, optimizer, teacher = _tiny_parts(1)  # other initial weights: the load must overwrite them
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=optimizer, teacher=teacher)
    assert state["step"] == 4 and state["marker"] == 4
    for (n, p), (_, q) in zip(trainable_named_parameters(parts[0]), trainable_named_parameters(model)):
        assert torch.equal(p, q), n  # stored and loaded bit for bit
    assert all(torch.equal(parts[2].weights[n], teacher.weights[n]) for n in teacher.weights)
    _train_step(model, optimizer, teacher)  # the loaded optimiser state is usable


def test_rotation_never_deletes_the_checkpoint_latest_names_and_none_keeps_all(tmp_path):
    parts = _tiny_parts(0)
    for step in (1, 2, 3):
        _save(tmp_path, step, parts, limit=None)
    assert len(complete_checkpoints(tmp_path)) == 3
    (tmp_path / "checkpoints" / "latest").write_text("step-000001\n")  # latest points back at the oldest
    deleted = rotate_checkpoints(tmp_path, 1)
    assert [p.name for p in deleted] == ["step-000002"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001", "step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no hidden .deleting/.tmp directory left behind


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_a_bad_save_total_limit_is_refused_before_anything_is_written(tmp_path, limit):
    with pytest.raises(ValueError, match=r"save_total_limit=.* must be an integer >= 1 .*or null \(keep all\)"):
        _save(tmp_path, 1, _tiny_parts(0), limit=limit)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"rotate_checkpoints\(limit\)"):
        rotate_checkpoints(tmp_path, limit)


def test_non_finite_and_non_numeric_values_reach_only_jsonl(tmp_path):
    assert logging_module._scalars(LOGGED[1]) == {"loss": LOGGED[1]["loss"], "reward": LOGGED[1]["reward"]}
    assert logging_module._scalars({"a": np.float32(0.5), "b": np.int64(3), "c": -math.inf}) == {"a": 0.5, "b": 3}
