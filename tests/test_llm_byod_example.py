"""The "bring your own data" example (examples/byod, llm/recipes/byod-tiny.yaml, docs/byod.md): the dataset script
writes files PromptDataset reads, the two reward functions score hand-made items as computed by hand (and as the
built-in judge whose wording they reuse), the shipped recipe loads, and a real two-step run of the tiny model on the
generated data logs both functions and the held-out evaluation."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from llm_helpers import metrics_rows

from llm.data import PromptDataset
from llm.recipe import load_recipe, resolve_recipe_path
from llm.rewards import RewardFunctions, load_file_module
from llm.tasks import judge_word, parse_word_prompt
from llm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread for tiny models

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "byod"
make_dataset = load_file_module(EXAMPLE / "make_dataset.py")
rewards = load_file_module(EXAMPLE / "rewards.py")
COLUMNS = ["length", "required", "forbidden", "ending"]
# the scores below take a handful of float64 operations each: a few units in the last place of error at most
EPS64 = sys.float_info.epsilon


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("byod") / "data"
    assert make_dataset.main(["--out", str(out)]) == 0
    return out


def test_make_dataset_writes_held_out_train_and_eval_files_that_prompt_dataset_reads(data, tmp_path):
    train = PromptDataset.load(str(data / "train.jsonl"))
    held_out = PromptDataset.load(str(data / "eval.jsonl"), field_name="task.eval_dataset")
    assert (len(train), len(held_out)) == (200, 32)
    assert train.column_names == COLUMNS and held_out.column_names == COLUMNS  # privileged_context is not a column
    rows = train.rows(0, 200) + held_out.rows(0, 32)
    for row in rows:  # the prompt says what the columns say (the columns are what the reward functions read)
        spec = parse_word_prompt(row.prompt)
        assert (spec.length, spec.required, spec.forbidden, spec.ending) == tuple(row.columns[c] for c in COLUMNS)
        assert row.messages == ()
    assert len({r.prompt for r in rows}) == 232  # distinct constraint sets: the eval prompts are held out
    hints = [r.context for r in train.rows(0, 200)]
    assert all((h is not None) == (i % 3 == 0) for i, h in enumerate(hints))  # --hint-every 3 (the default)
    assert hints[0] == f"hint: end with '{train.row(0).columns['ending']}'"
    # seeded: the same arguments write the same bytes; another seed other prompts
    again = tmp_path / "again"
    assert make_dataset.main(["--out", str(again)]) == 0
    assert (again / "train.jsonl").read_bytes() == (data / "train.jsonl").read_bytes()
    assert make_dataset.main(["--out", str(tmp_path / "other"), "--seed", "1"]) == 0
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (data / "train.jsonl").read_bytes()


def test_chat_prompts_are_one_user_message_with_the_same_text(data, tmp_path):
    assert make_dataset.main(["--out", str(tmp_path), "--chat", "--train-rows", "5", "--eval-rows", "2"]) == 0
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0]["role"] == "user" and len(first["prompt"]) == 1
    chat = PromptDataset.load(str(tmp_path / "train.jsonl")).rows(0, 5)
    text = PromptDataset.load(str(data / "train.jsonl")).rows(0, 5)
    assert [r.prompt for r in chat] == [r.prompt for r in text] and all(r.messages == () for r in chat)


@pytest.mark.parametrize("argv, words", [
    (["--out", "{file}"], "is an existing file"),
    (["--out", "{file}/sub"], "cannot be created"),
    (["--train-rows", "0"], "train_rows=0 must be an integer >= 1"),
    (["--train-rows", "480"], "exceeds the 500 distinct constraint sets"),
    (["--hint-every", "-1"], "hint_every=-1"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, argv, words):
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = [a.replace("{file}", str(file)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    assert make_dataset.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("make_dataset.py: error: ")
    assert not (tmp_path / "new").exists() and file.read_text() == "x"


def test_an_argument_argparse_refuses_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_dataset.main(["--train-rows", "many"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'many'" in err


# hand-made items: (completion, its row's length/required/forbidden/ending) -> constraints score, critique, brevity
ITEMS = [
    ("salt", (4, "a", "b", "t"), 1.0, "all constraints met", 1.0),
    # 3 letters for 4: length_ok = 1 − 1/4; has 'b': (0.75 + 1 + 0 + 1) / 4; brevity min(1, 4/3)
    (" bat\n", (4, "a", "b", "t"), 0.6875, "too short (3 letters): add 1; has 'b': remove it", 1.0),
    # 4 of 6 characters are a–z; length_ok = 1 − 2/4; no 'a', no 'b', ends in '!': (2/3)·(0.5 + 0 + 1 + 0)/4; 4/6
    ("Hello!", (4, "a", "b", "t"), 0.25,
     "use lowercase letters only; too long (6 letters): drop 2; missing 'a': add it; ends in '!': end with 't'", 4 / 6),
    ("  ", (4, "a", "b", "t"), 0.0, "empty answer: write 4 letters ending in 't'", None),  # brevity: nothing to measure
    ("salt", (None, None, None, None), None, None, None),  # a row without constraints: neither function scores it
]


def _columns(items) -> dict:
    return {c: [item[1][k] for item in items] for k, c in enumerate(COLUMNS)}


def test_the_two_reward_functions_on_hand_made_items():
    completions = [i[0] for i in ITEMS]
    prompts = ["(the prompt is not read)"] * len(ITEMS)
    got = rewards.constraints(prompts, completions, **_columns(ITEMS), topic=["unused"] * len(ITEMS))  # **kwargs
    for judgement, (_, _, score, critique, _) in zip(got, ITEMS):
        if score is None:
            assert judgement is None
        else:
            assert judgement.score == pytest.approx(score, rel=4 * EPS64, abs=0) and judgement.critique == critique
    short = rewards.brevity(prompts, completions, length=_columns(ITEMS)["length"])
    assert short[:3] == [1.0, 1.0, pytest.approx(4 / 6, rel=4 * EPS64)] and short[3:] == [None, None]
    assert rewards.brevity(["p"], ["saltier"], [4]) == [pytest.approx(4 / 7, rel=4 * EPS64)]


def test_the_functions_combined_as_the_recipe_names_them(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's specs are relative to the repository root
    recipe = load_recipe(resolve_recipe_path("byod-tiny"))
    scorer = RewardFunctions.from_specs(recipe.task.reward_funcs, recipe.task.reward_weights)
    assert scorer.names == ["constraints", "brevity"] and scorer.weights == [0.8, 0.2]
    batch = scorer(["p"] * len(ITEMS), [i[0] for i in ITEMS], _columns(ITEMS))
    # weighted mean over the functions that scored the item: (0.8·c + 0.2·b) / 1, or c alone where brevity said None
    want = [0.8 * 1.0 + 0.2 * 1.0, 0.8 * 0.6875 + 0.2 * 1.0, 0.8 * 0.25 + 0.2 * (4 / 6), 0.0]
    assert [j.score for j in batch.judgements[:4]] == pytest.approx(want, rel=4 * EPS64, abs=0)
    assert batch.judgements[4] is None and batch.unscored == 1 and batch.failures == 0
    assert batch.judgements[1].critique == ITEMS[1][3]  # brevity returns numbers: only constraints' critique
    assert batch.scored == {"constraints": 4, "brevity": 3}


def test_constraints_scores_and_critiques_as_the_built_in_judge_whose_wording_it_reuses():
    rng = random.Random(0)
    specs = make_dataset.SPECS
    for _ in range(300):
        spec = rng.choice(specs)
        word = "".join(rng.choice("abcdefglnrstuoi!X ") for _ in range(rng.randint(0, 8)))
        mine = rewards.constraints([""], [word], [spec["length"]], [spec["required"]], [spec["forbidden"]], [spec["ending"]])[0]
        assert mine == judge_word(make_dataset.PROMPT.format(**spec), word), (spec, word)


def _byod_recipe(tiny_dir: Path, out: Path, data: Path, **overrides):
    """The shipped byod-tiny recipe on the test's tiny model and data, small enough for a test."""
    base = {"model.path": str(tiny_dir), "training.output_dir": str(out), "task.dataset": str(data / "train.jsonl"),
            "task.eval_dataset": str(data / "eval.jsonl"), "training.steps": 2, "training.prompts_per_step": 2,
            "training.max_new_tokens": 6, "training.save_every": 0, "training.heatmap_every": 0,
            "method.num_generations": 3, "context.max_context_tokens": 200, "training.eval_steps": 2,
            "training.eval_prompts": 4, "training.eval_num_generations": 2}
    base.update(overrides)
    return load_recipe(resolve_recipe_path("byod-tiny"), base)


def test_the_recipe_loads_with_the_data_paths_overridden(data, tmp_path):
    shipped = load_recipe(resolve_recipe_path("byod-tiny"))
    assert resolve_recipe_path("byod-tiny") == REPO / "llm" / "recipes" / "byod-tiny.yaml"
    assert (shipped.task.dataset, shipped.task.eval_dataset) == ("examples/byod/data/train.jsonl", "examples/byod/data/eval.jsonl")
    assert shipped.task.reward_funcs == ["examples/byod/rewards.py:constraints", "examples/byod/rewards.py:brevity"]
    assert shipped.task.reward_weights == [0.8, 0.2] and shipped.training.eval_steps == 10
    assert shipped.training.output_dir == "outputs/llm-byod-tiny" and shipped.task.context_column == "privileged_context"
    recipe = _byod_recipe(Path("outputs/tiny-model"), tmp_path / "run", data)
    assert recipe.task.dataset == str(data / "train.jsonl") and recipe.task.reward_funcs == shipped.task.reward_funcs


def test_two_training_steps_on_the_generated_data_with_both_functions_and_the_eval_split(tiny_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's reward specs are relative to the repository root
    out = tmp_path / "run"
    trainer = Trainer(_byod_recipe(tiny_dir, out, data))
    assert trainer.rewards.names == ["constraints", "brevity"] and len(trainer.eval_rows) == 4
    assert trainer.prompts.column_names == COLUMNS and trainer.dropped_prompts == 0
    trainer.train()
    logged = metrics_rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    for row in logged:
        assert 0.0 <= row["reward/constraints"] <= 1.0 and 0.0 <= row["reward/brevity"] <= 1.0 and 0.0 <= row["reward"] <= 1.0
        # constraints scores every item that has its columns (every row here), even an empty answer
        assert row["reward_failures"] == 0 and row["judge_failures"] == 0
    assert "eval_reward" not in logged[0] and {"eval_reward", "eval_reward_greedy", "eval_pass@2", "eval_unscored"} <= set(logged[1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] == {k: logged[1][k] for k in ("eval_reward", "eval_reward_greedy", "eval_pass@2", "eval_unscored")}
    assert summary["eval"]["eval_unscored"] == 0 and 0.0 <= summary["eval"]["eval_reward"] <= 1.0
