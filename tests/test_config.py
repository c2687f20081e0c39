"""MethodConfig: round trips through YAML/JSON/files, unknown keys, and every bad input named clearly."""

from __future__ import annotations

import json

import pytest
import yaml

from sdpo_sim.core.method import METHODS, TEACHER_KINDS, MethodConfig

NON_DEFAULT = dict(
    name="hybrid", alpha=0.0, support="topk", topk=100, add_tail=False, is_clip=3.0, teacher_kind="trust_region",
    teacher_rate=0.01, controller="entropy", alpha_mix=0.7, divergence_tau=0.2, entropy_target=1.1,
    entropy_gain=0.25, num_generations=4, scale_rewards="batch", loss_type="dr_grpo", epsilon=0.1, temperature=0.7,
    distill_loss="forward_ce", distill_prompt_weight="success_std", distill_token_weight="teacher_confidence",
    distill_gate="positive_advantage", distill_warmup_steps=5, distill_decay_steps=7, blend_lambda=0.5, ref_beta=0.04,
    use_bias_correction_kl=False, ref_anchor=0.001,
)


def test_non_default_example_really_changes_every_field():
    default = MethodConfig().to_dict()
    assert set(NON_DEFAULT) == set(MethodConfig.field_names())
    assert all(NON_DEFAULT[k] != default[k] for k in NON_DEFAULT)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_text_round_trip(fmt):
    cfg = MethodConfig.from_dict(NON_DEFAULT)
    text = cfg.to_yaml() if fmt == "yaml" else cfg.to_json()
    back = MethodConfig.from_yaml(text) if fmt == "yaml" else MethodConfig.from_json(text)
    assert back == cfg and back.to_dict() == NON_DEFAULT


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    cfg = MethodConfig.from_dict(NON_DEFAULT)
    path = tmp_path / f"method{suffix}"
    cfg.save(path)
    assert MethodConfig.load(path) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write left no temp file


def test_load_recipe_with_method_section_and_yaml_ints(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "method": {"name": "sdpo", "alpha": 1, "support": "sampled"}}))
    cfg = MethodConfig.load(path)
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float) and cfg.support == "sampled"


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert MethodConfig.load(path) == MethodConfig()


def test_replace_validates():
    cfg = MethodConfig()
    assert cfg.replace(alpha=0.5).alpha == 0.5 and cfg.alpha == 1.0
    with pytest.raises(ValueError, match=r"MethodConfig.alpha=2\.0"):
        cfg.replace(alpha=2.0)


def test_unknown_keys_are_named_with_known_fields(tmp_path):
    with pytest.raises(ValueError, match=r"unknown MethodConfig field\(s\) 'lr', 'topK'; known fields: name, alpha"):
        MethodConfig.from_dict({"topK": 5, "lr": 1e-5})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"methd": "sdpo"}))
    with pytest.raises(ValueError, match=r"bad\.json: unknown MethodConfig field\(s\) 'methd'"):
        MethodConfig.load(path)


def test_bad_files(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml or \.json"):
        MethodConfig.load(path)
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"must be a mapping of field names to values, got list"):
        MethodConfig.load(path)


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


BAD = [
    ({"name": "ppo"}, rf"MethodConfig.name='ppo' is not allowed; choose one of {_allowed(METHODS)}"),
    ({"alpha": 1.5}, r"MethodConfig.alpha=1\.5 must be a number in \[0\.0, 1\.0\]"),
    ({"alpha": -0.5}, r"MethodConfig.alpha=-0\.5 must be a number in \[0\.0, 1\.0\]"),
    ({"alpha": "half"}, r"MethodConfig.alpha='half' must be a number"),
    ({"alpha": float("nan")}, r"MethodConfig.alpha=nan must be a number"),
    ({"support": "dense"}, r"MethodConfig.support='dense' is not allowed; choose one of 'full', 'topk', 'sampled'"),
    ({"support": "topk"}, r"MethodConfig.topk=None must be a positive integer when support='topk'"),
    ({"support": "topk", "topk": 0}, r"MethodConfig.topk=0 must be a positive integer"),
    ({"support": "topk", "topk": True}, r"MethodConfig.topk=True must be a positive integer"),
    ({"topk": -3}, r"MethodConfig.topk=-3 must be a positive integer or null"),
    ({"support": "sampled", "alpha": 0.5}, r"MethodConfig.support='sampled' needs alpha=1\.0"),
    ({"add_tail": "yes"}, r"MethodConfig.add_tail='yes' must be true or false"),
    ({"is_clip": 0.0}, r"MethodConfig.is_clip=0\.0 must be a number in \(0\.0, 1000\.0\]"),
    ({"teacher_kind": "moving"}, rf"MethodConfig.teacher_kind='moving' is not allowed; choose one of {_allowed(TEACHER_KINDS)}"),
    ({"teacher_rate": 1.5}, r"MethodConfig.teacher_rate=1\.5 must be a number in \[0\.0, 1\.0\]"),
    ({"controller": "pid"}, r"MethodConfig.controller='pid' is not allowed; choose one of 'constant', 'divergence', 'entropy'"),
    ({"alpha_mix": 2.0}, r"MethodConfig.alpha_mix=2\.0 must be a number in \[0\.0, 1\.0\]"),
    ({"divergence_tau": 0.0}, r"MethodConfig.divergence_tau=0\.0 must be a number in \[1e-06, 1000\.0\]"),
    ({"entropy_target": -1.0}, r"MethodConfig.entropy_target=-1\.0 must be a number in \[0\.0, 1000\.0\]"),
    ({"name": "hybrid", "controller": "entropy"}, r"MethodConfig.entropy_target must be set"),
    ({"entropy_gain": -0.1}, r"MethodConfig.entropy_gain=-0\.1 must be a number in \[0\.0, 1000\.0\]"),
    ({"num_generations": 0}, r"MethodConfig.num_generations=0 must be a positive integer"),
    ({"num_generations": 2.5}, r"MethodConfig.num_generations=2\.5 must be a positive integer"),
    ({"name": "grpo", "num_generations": 1}, r"MethodConfig.num_generations must be ≥ 2 for name='grpo'"),
    ({"scale_rewards": "std"}, r"MethodConfig.scale_rewards='std' is not allowed; choose one of 'group', 'batch', 'none'"),
    ({"loss_type": "bnpo"}, r"MethodConfig.loss_type='bnpo' is not allowed; choose one of 'token_mean', 'sequence_mean', 'dr_grpo'"),
    ({"epsilon": -0.2}, r"MethodConfig.epsilon=-0\.2 must be a number in \[0\.0, 1000\.0\]"),
    ({"temperature": 0.0}, r"MethodConfig.temperature=0\.0 must be a number in \[0\.001, 1000\.0\]"),
]


@pytest.mark.parametrize("data,match", BAD, ids=[str(d) for d, _ in BAD])
def test_bad_values_are_named_with_allowed_values(data, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig.from_dict(data)


def test_reinforce_allows_single_generation_and_valid_variants():
    assert MethodConfig(name="reinforce", num_generations=1).num_generations == 1
    assert MethodConfig(support="topk", topk=100, alpha=0.5).topk == 100
    assert MethodConfig(name="hybrid", controller="entropy", entropy_target=1.5).entropy_target == 1.5
