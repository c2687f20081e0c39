"""benchmarks/gpu_check.py cannot rot: its dry run (CPU, tiny sizes) runs every section, writes a results file that
RESULTS.md renders, and the figures that are checks rather than measurements hold (the same loss on both sides of a
comparison, a synced engine agreeing with the trainer, a stale one not)."""

from __future__ import annotations

import json
import time

import pytest
from bench_helpers import load_benchmark
from llm_helpers import EPS32

gpu_check, run_all = load_benchmark("gpu_check"), load_benchmark("run_all")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    t0 = time.perf_counter()
    rc = gpu_check.main(["--dry-run", "--out-dir", str(out), "--work-dir", str(out / "work")])
    seconds = time.perf_counter() - t0
    return rc, json.loads((out / "gpu_check_dry_run.json").read_text()), seconds


def test_every_section_runs_and_is_recorded(dry_run):
    rc, res, seconds = dry_run
    assert rc == 0, res["settings"]["failures"]
    assert list(res["settings"]["sections"]) == list(gpu_check.SECTIONS)
    assert all(v.startswith("ok") for v in res["settings"]["sections"].values()), res["settings"]["sections"]
    assert res["name"] == "gpu_check_dry_run"  # never the GPU run's file
    for key in ("fused_loss/ours_fused", "fused_loss/trl_full", "train_qwen3_1_7b", "train_qwen3_8b_lora",
                "sdpo_vs_trl/ours", "sdpo_vs_trl/trl", "vllm/generate", "vllm/gap_synced", "vllm/gap_stale"):
        assert key in res["raw"], key
    assert all(res["raw"][k]["tokens_per_s"] > 0 for k in ("train_qwen3_1_7b", "train_qwen3_8b_lora", "vllm/generate"))
    # the dry run's budget is 60 s on an idle machine; this guards against sizes that grew (a GPU-sized run takes hours
    # on a CPU) with room for the shared 2-core machine's load
    assert seconds < 150


def test_the_comparisons_compare_the_same_loss(dry_run):
    details = dry_run[1]["settings"]["details"]
    # float32 everywhere in the dry run: each log-probability carries a rounding error of a few eps·|logit| (logits of
    # order 1 here), and a KL = Σ p·(log p − log q) about twice that; the loss is O(1) for the fused comparison
    assert details["fused_loss"]["loss_relative_spread"] <= 64 * EPS32
    ours, trl = details["sdpo_vs_trl"]["loss_at_start"].values()
    assert abs(ours - trl) <= 64 * EPS32 and trl > 0
    assert details["train_qwen3_8b_lora"]["trainable"] < details["train_qwen3_8b_lora"]["parameters"] / 2  # LoRA only
    assert details["train_qwen3_1_7b"]["trainable"] == details["train_qwen3_1_7b"]["parameters"]
    assert details["train_qwen3_1_7b"]["fused"] is True  # the dry run lowers fused_min_vocab: the fused path runs
    assert "total_gb" in details["train_qwen3_1_7b"]["plan"]  # the memory plan ran on the recipe


def test_the_synced_engine_agrees_with_the_trainer_and_a_stale_one_does_not(dry_run):
    raw, details = dry_run[1]["raw"], dry_run[1]["settings"]["details"]["vllm"]
    assert raw["vllm/gap_synced"]["gap_max_abs"] <= 1e-6  # the same float32 computation on equal weights
    # merged LoRA weights (engine) vs peft's unmerged forward (trainer): float32 rounding of two association orders
    assert raw["vllm/gap_lora"]["gap_max_abs"] <= 1e-4
    assert raw["vllm/gap_stale"]["gap_mean_abs"] > 0.02  # weights moved by noise as large as their own spread
    syncs = details["syncs"]
    assert syncs["first"]["tensors"] == syncs["after_update"]["tensors"] > 0  # full fine-tuning: everything, each time
    layers = gpu_check.TINY["num_hidden_layers"]
    assert syncs["lora"]["tensors"] == 7 * layers  # after the first LoRA sync: the merged adapted projections only


def test_results_render_into_results_md(dry_run):
    res = dry_run[1]
    text = run_all.render([res], {"cpu": "x", "cores": 2, "ram_gib": 1.0, "os": "x"}, {"python": "3.11"}, {}, "now")
    for fig in res["figures"]:
        assert f"| gpu_check_dry_run | {fig['figure']} |" in text
    assert "### gpu_check_dry_run: GPU check dry run" in text


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--sections", "fused_loss,nope"])
    assert "--sections: unknown nope" in capsys.readouterr().err


@pytest.mark.slow
def test_a_section_in_a_child_process(tmp_path):
    """The GPU run's isolation: a section in its own process, its result read back (here the dry run's fused loss)."""
    rc = gpu_check.main(["--dry-run", "--isolate", "--sections", "fused_loss", "--out-dir", str(tmp_path),
                         "--work-dir", str(tmp_path / "work")])
    res = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert rc == 0 and res["settings"]["sections"]["fused_loss"].startswith("ok")
    assert "fused_loss/ours_fused" in res["raw"]
