"""A user's own task end to end on the tiny model: prompts from a JSONL file and from a `datasets` directory, two weighted
reward functions from a .py file plus an LLM judge, an eval split, every tracker; a SIGKILLed run resumes at the same
dataset position (the prompts after the resume are those an uninterrupted run reads)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from llm_helpers import metrics_rows, tiny_recipe

from llm.data import PromptDataset
from llm.tasks import sample_word_prompts
from llm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models

# Two reward functions in a user's file. `letters` reads a dataset column (keyword argument); `short` scores only
# answers of at most `limit` characters and leaves the others unscored (None). Each call appends the prompts it saw
# to SEEN (when set), so a test can tell which dataset rows a step read.
REWARDS = '''
import json, os
from llm.feedback import Judgement

def letters(prompts, completions, target, **kw):
    seen = os.environ.get("SEEN")
    if seen:
        with open(seen, "a") as f:
            f.write(json.dumps(prompts) + "\\n")
    out = []
    for c, t in zip(completions, target):
        share = sum(ch in t for ch in c) / max(1, len(c))
        out.append(Judgement(share, "use the letters " + t if share < 1 else "good letters"))
    return out

def short(prompts, completions, limit, **kw):
    return [None if len(c.strip()) > l else 1.0 - len(c.strip()) / (l + 1) for c, l in zip(completions, limit)]
'''


def _rows(n: int, seed: int) -> list[dict]:
    prompts = sample_word_prompts(random.Random(seed), n)
    return [{"prompt": p, "target": "aeiou", "limit": 6, "privileged_context": "hint: short words score" if i % 2 else None}
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user-task")
    (d / "my_rewards.py").write_text(REWARDS)
    datasets.Dataset.from_list(_rows(40, 0)).to_json(str(d / "train.jsonl"))
    datasets.Dataset.from_list(_rows(6, 1)).to_json(str(d / "eval.jsonl"))
    chat = [{**r, "prompt": [{"role": "system", "content": "answer with one word"}, {"role": "user", "content": r["prompt"]}]} for r in _rows(12, 2)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat), "test": datasets.Dataset.from_list(chat[:4])}).save_to_disk(str(d / "chat"))
    return d


def _user_recipe(tiny_dir, out, files, **overrides):
    base = {"task__dataset": str(files / "train.jsonl"), "task__eval_dataset": str(files / "eval.jsonl"),
            "task__reward_funcs": [f"{files / 'my_rewards.py'}:letters", f"{files / 'my_rewards.py'}:short"],
            "task__reward_weights": [3.0, 1.0], "training__eval_steps": 2, "training__eval_prompts": 4,
            "training__eval_num_generations": 2}
    base.update(overrides)
    return tiny_recipe(tiny_dir, out, **base)


def test_a_jsonl_dataset_with_two_weighted_reward_functions_an_llm_judge_an_eval_split_and_every_tracker(tiny_dir, user_files, tmp_path):
    out = tmp_path / "run"
    funcs = [f"{user_files / 'my_rewards.py'}:letters", f"{user_files / 'my_rewards.py'}:short", str(tiny_dir)]  # tiny_dir: an LLM judge
    recipe = _user_recipe(tiny_dir, out, user_files, task__reward_funcs=funcs, task__reward_weights=[3.0, 1.0, 1.0],
                          training__report_to=["jsonl", "tensorboard", "wandb"])
    trainer = Trainer(recipe)
    assert trainer.rewards.names == ["letters", "short", tiny_dir.name]
    rows = trainer.train()
    logged = metrics_rows(out)
    assert [r["step"] for r in logged] == [1, 2] and len(rows) == 2
    last = logged[-1]
    for key in ("reward", "reward/letters", "reward/short", "eval_reward", "eval_reward_greedy", "eval_pass@2", "eval_unscored",
                "reward_failures", "judge_failures", "truncated_fraction"):
        assert key in last, key
    assert "eval_reward" not in logged[0]  # evaluated every 2 steps
    assert 0.0 <= last["reward/letters"] <= 1.0 and last["reward_failures"] == 0
    # the random tiny model cannot write "score: X/10": every LLM-judge answer is unparseable, so it scores nothing and
    # the combined score is the weighted mean of the two file functions alone
    judge = trainer.rewards.funcs[2]
    assert judge.unparseable > 0 and f"reward/{tiny_dir.name}" in last and last[f"reward/{tiny_dir.name}"] is None
    assert sum(r["judge_unparseable"] for r in logged) == 2 * 2 * 3  # steps × prompts × generations: every training answer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == {k: last[k] for k in summary["eval"]} and summary["dropped_prompts"] == 0
    # trackers: TensorBoard events and a W&B offline run inside output_dir
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_datasets_directory_with_conversation_prompts_and_its_test_split(tiny_dir, user_files, tmp_path):
    out = tmp_path / "run"
    recipe = _user_recipe(tiny_dir, out, user_files, task__dataset=str(user_files / "chat"), task__eval_dataset=None,
                          task__eval_split="test", training__eval_steps=0)
    trainer = Trainer(recipe)
    assert len(trainer.prompts) == 12 and len(trainer.eval_rows) == 4 and trainer.eval_rows[0].messages[0]["role"] == "system"
    trainer.train()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"eval_reward", "eval_reward_greedy", "eval_pass@2", "eval_unscored"}  # the final evaluation


def test_long_prompts_are_dropped_with_a_count_not_truncated(tiny_dir, user_files, tmp_path):
    rows = _rows(5, 3)
    rows[2]["prompt"] = "x" * 500  # over max_prompt_length (128 tokens of the character tokenizer)
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "long.jsonl"))
    trainer = Trainer(_user_recipe(tiny_dir, tmp_path / "run", user_files, task__dataset=str(tmp_path / "long.jsonl"),
                                   task__eval_dataset=None, training__eval_steps=0))
    assert trainer.dropped_prompts == 1 and len(trainer.prompts) == 4
    assert all(len(r.prompt) < 500 for r in trainer.prompts.rows(0, 4))


def _bad(files: Path, case: str) -> dict:
    if case == "no such function":
        return {"task__reward_funcs": [f"{files}/my_rewards.py:nothing"], "task__reward_weights": None}
    if case == "no such dataset":
        return {"task__dataset": f"{files}/missing.jsonl"}
    datasets.Dataset.from_list([{"prompt": "hi"}]).to_json(str(files / "nocol.jsonl"))  # no column `target`
    return {"task__dataset": str(files / "nocol.jsonl"), "task__reward_funcs": [f"{files}/my_rewards.py:letters"], "task__reward_weights": None}


@pytest.mark.parametrize("case, message", [("no such function", "nothing"), ("no such dataset", "missing.jsonl"),
                                           ("a column the function needs is missing", "target")])
def test_a_user_task_that_cannot_run_is_refused_before_the_model_loads(tiny_dir, user_files, tmp_path, case, message):
    with pytest.raises(ValueError, match=message):
        Trainer(_user_recipe(tiny_dir, tmp_path / "run", user_files, **_bad(user_files, case)))
    assert not (tmp_path / "run").exists()


def _calls(path: Path) -> list[list[str]]:
    """The prompts each reward-function call saw, in call order (one call per training step here)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_cmd(recipe_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llm", "train", "--recipe", str(recipe_path), *extra]


def test_a_run_killed_mid_way_resumes_at_the_same_dataset_position(tiny_dir, user_files, tmp_path):
    recipes = {}
    for name in ("straight", "killed"):
        r = _user_recipe(tiny_dir, tmp_path / name, user_files, training__steps=4, training__save_every=1, training__eval_steps=0,
                         task__eval_dataset=None)
        recipes[name] = tmp_path / f"{name}.yaml"
        r.save(recipes[name])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_train_cmd(recipes["straight"]), env={**env, "SEEN": str(tmp_path / "straight.seen")},
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    seen_env = {**env, "SEEN": str(tmp_path / "killed.seen")}
    proc = subprocess.Popen(_train_cmd(recipes["killed"]), env=seen_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip().endswith("2"):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = int(latest.read_text().strip().rsplit("-", 1)[-1])
    assert 1 <= step < 4, f"the kill came after the run finished (checkpoint {step})"
    state = torch.load(tmp_path / "killed" / "checkpoints" / f"step-{step:06d}" / "state.pt", weights_only=True)
    dataset = PromptDataset.load(str(user_files / "train.jsonl"))
    assert state["data_position"] == dataset.position(step, 2) and state["dataset_rows"] == len(dataset)
    resumed = subprocess.run(_train_cmd(recipes["killed"], "--resume"), env=seen_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _calls(tmp_path / "straight.seen"), _calls(tmp_path / "killed.seen")
    assert len(want) == 4 and got[-(4 - step):] == want[step:]  # the steps after the checkpoint read the same prompts


def test_masked_truncated_completions_get_no_loss_and_are_not_demonstrations(tiny_dir, user_files, tmp_path):
    # 2 new tokens: the random tiny model (vocabulary ~100 characters) almost never samples its end token that early
    trainer = Trainer(_user_recipe(tiny_dir, tmp_path / "run", user_files, training__max_new_tokens=2,
                                   training__mask_truncated_completions=True, context__success_threshold=0.0))
    batch, info = trainer.rollout(0)
    truncated = [len(c) >= 2 and c[-1] != trainer.tokenizer.eos_token_id for c in info["completion_ids"]]
    assert info["truncated"] == sum(truncated) > 0
    for row, cut in enumerate(truncated):
        if cut:  # judged (it counts in the reward) but no policy-gradient or distillation loss
            assert batch.judged[row] == 0 and batch.distill_mask[row] == 0
    plain = Trainer(_user_recipe(tiny_dir, tmp_path / "plain", user_files, training__max_new_tokens=2, context__success_threshold=0.0))
    batch, _ = plain.rollout(0)
    assert batch.judged.sum() > 0 and batch.distill_mask.sum() > 0  # the same rollout unmasked trains on them


def test_a_run_keeps_only_save_total_limit_checkpoints(tiny_dir, user_files, tmp_path):
    out = tmp_path / "run"
    Trainer(_user_recipe(tiny_dir, out, user_files, training__steps=3, training__save_every=1, training__save_total_limit=2,
                         training__eval_steps=0, task__eval_dataset=None)).train()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000002", "step-000003"] and (out / "checkpoints" / "latest").read_text().strip().endswith("3")
