"""vLLM generation without vLLM: the weight sync (names, LoRA merge, what is sent when), the log-probability gap, the
server protocol end to end (``llm.vllm_server`` over real HTTP, serving a transformers model) and the recipe fields.

vLLM itself needs a GPU: :class:`llm.generation.VLLMEngine` is exercised by ``benchmarks/gpu_check.py`` only. Here the
engine behind the server is :class:`llm.generation.TransformersEngine`, our own implementation of the same interface
(it samples exactly what the transformers backend samples), so what is checked is everything of ours around vLLM.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.generation import (
    ServerClient,
    TransformersEngine,
    TransformersGenerator,
    VLLMGenerator,
    completion_logprobs,
    generation_request,
    iter_sync_weights,
    logprob_gap,
    sample_seed,
    vllm_weight_name,
    warp_logits,
    weight_buckets,
)
from llm.recipe import GenerationConfig, Recipe
from llm.trainer import Trainer
from llm.vllm_server import make_server
from llm_helpers import EPS32, tiny_recipe

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
SEEDS = [101, 202, 303]


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _lora(model, seed: int = 0):
    """peft LoRA on three projections, with random (non-zero) factors: a zero B would make any merge look right."""
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return lora


@pytest.fixture
def served(tiny_dir):
    """A server on a free port serving a transformers copy of the tiny model; yields (url, engine)."""
    model, tok = _load(tiny_dir)
    engine = TransformersEngine(model, tok, str(tiny_dir))
    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", engine
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------- weight names and merge
@pytest.mark.parametrize("name,expected", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.mlp.down_proj.base_layer.bias", "model.layers.0.mlp.down_proj.bias"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", None),
    ("model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
    ("_orig_mod.model.norm.weight", "model.norm.weight"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("base_model.model.lm_head.original_module.weight", None),
])
def test_vllm_weight_names(name, expected):
    assert vllm_weight_name(name) == expected


def test_a_plain_model_syncs_its_parameters_and_then_only_the_trainable_ones(tiny_dir):
    model, _ = _load(tiny_dir)
    synced = dict(iter_sync_weights(model))
    params = dict(model.named_parameters())  # tied embedding/LM head: once, as vLLM wants
    assert list(synced) == list(params) and "lm_head.weight" not in synced
    assert all(torch.equal(synced[n], p) for n, p in params.items())
    model.model.embed_tokens.weight.requires_grad_(False)
    changed = [n for n, _ in iter_sync_weights(model, changed_only=True)]
    assert changed == [n for n in params if n != "model.embed_tokens.weight"]


def test_lora_weights_are_merged_as_peft_merges_them(tiny_dir):
    model, _ = _load(tiny_dir)
    lora = _lora(model)
    ours = dict(iter_sync_weights(lora))
    reference = copy.deepcopy(lora).merge_and_unload()  # peft's own merge, on a copy
    theirs = dict(reference.named_parameters())
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        # same float32 operations (W + s·B@A); allow a few roundings of values of magnitude max|W|
        tol = 4 * EPS32 * float(tensor.abs().max())
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=tol, msg=name)
    adapted = {f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert any(not torch.equal(ours[n], dict(model.named_parameters())[n.replace(".weight", ".base_layer.weight")]) for n in adapted)
    # after the first sync only the adapted layers can change: the frozen base weights are not sent again
    assert {n for n, _ in iter_sync_weights(lora, changed_only=True)} == adapted


def test_weight_buckets_hold_at_most_max_bytes_and_keep_order():
    weights = [(f"w{i}", torch.ones(n)) for i, n in enumerate([10, 10, 30, 5, 100])]  # float32: 4 bytes each
    buckets = list(weight_buckets(iter(weights), max_bytes=80, dtype=torch.bfloat16))  # 2 bytes each after the cast
    assert [list(b) for b in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4"]]  # 40+40 | 60+10 (+200 would pass 80) | 200 alone
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for b in buckets for t in b.values())
    with pytest.raises(ValueError, match="max_bytes=0"):
        list(weight_buckets(iter(weights), max_bytes=0))


# ------------------------------------------------------------------------------------------- log-probabilities
def test_logprob_gap_on_given_values():
    trainer = [[-1.0, -2.0], [-0.5], []]
    engine = [[-1.25, -2.0], [-0.25], []]
    gap = logprob_gap(trainer, engine)
    assert gap["logprob_gap_mean_abs"] == pytest.approx(0.5 / 3)
    assert gap["logprob_gap_max_abs"] == pytest.approx(0.25)
    assert gap["logprob_gap_mean"] == pytest.approx(0.0)  # −0.25 and +0.25 cancel
    assert gap["logprob_gap_tokens"] == 3 and gap["logprob_gap_nonfinite"] == 0
    with_inf = logprob_gap([[-1.0, -math.inf]], [[-1.5, -3.0]])
    assert with_inf["logprob_gap_tokens"] == 1 and with_inf["logprob_gap_nonfinite"] == 1
    assert with_inf["logprob_gap_mean"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="completion 1 has 1 trainer log-probs and 2 engine"):
        logprob_gap([[-1.0], [-1.0]], [[-1.0], [-1.0, -2.0]])
    with pytest.raises(ValueError, match="2 trainer completions vs 1 engine"):
        logprob_gap([[-1.0], [-1.0]], [[-1.0]])


def test_completion_logprobs_equal_one_row_at_a_time_under_the_sampling_warp(tiny_dir):
    model, tok = _load(tiny_dir)
    spec = GenerationConfig(top_k=7, top_p=0.9)
    groups = TransformersGenerator(spec, 0.8, 6, tok)(model, PROMPTS, 2, SEEDS)
    rows = [g.prompt_ids for g in groups for _ in g.completion_ids]
    comps = [c for g in groups for c in g.completion_ids]
    batched = completion_logprobs(model, rows, comps, temperature=0.8, top_k=7, top_p=0.9, pad_id=tok.pad_token_id, batch_size=4)
    for prompt, comp, got in zip(rows, comps, batched):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:-1].float()
        want = warp_logits(logits, 0.8, 7, 0.9).log_softmax(-1).gather(-1, torch.tensor(comp).unsqueeze(-1)).squeeze(-1)
        assert len(got) == len(comp)
        # every sampled token lies inside the warp's support, so its log-prob is finite
        assert all(math.isfinite(x) for x in got)
        # padded batch vs one row: float32 rounding of different matmul shapes, ~1e-6 of logits of order 1
        torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- the server end to end
def test_server_mode_syncs_weights_and_samples_what_the_trainer_would(tiny_dir, served):
    url, engine = served
    trainer_model, tok = _load(tiny_dir)
    with torch.no_grad():  # the trainer has moved away from the weights the server loaded: sharper logits
        trainer_model.model.embed_tokens.weight.mul_(30.0)
    spec = GenerationConfig(backend="vllm", vllm_mode="server", vllm_server_url=url)
    gen = VLLMGenerator(spec, 1.0, 6, str(tiny_dir), "float32")  # builds its ServerClient from the recipe fields
    assert isinstance(gen.engine, ServerClient) and gen.engine.info()["engine"] == "transformers"

    # a stale engine: its log-probs of its own samples are far from the trainer's
    comps, stale_lp = gen.engine.generate(PROMPTS, 2, SEEDS, temperature=1.0, top_k=0, top_p=1.0, max_tokens=6, greedy=False)
    rows = [p for p in PROMPTS for _ in range(2)]
    stale = logprob_gap(completion_logprobs(trainer_model, rows, comps, temperature=1.0, pad_id=tok.pad_token_id), stale_lp)
    assert stale["logprob_gap_mean_abs"] > 0.5  # a 30× larger embedding moves the 101-way distribution by nats

    groups = gen(trainer_model, PROMPTS, 2, SEEDS)
    assert gen.last_sync["tensors"] == len(list(trainer_model.parameters()))
    served_params = dict(engine.model.named_parameters())
    assert all(torch.equal(served_params[n], p) for n, p in trainer_model.named_parameters())  # float32 round trip: exact
    # the engine samples what the transformers backend samples from the trainer's weights
    direct = TransformersGenerator(spec, 1.0, 6, tok)(trainer_model, PROMPTS, 2, SEEDS)
    assert [g.completion_ids for g in groups] == [g.completion_ids for g in direct]
    gap = gen.logprob_gap(trainer_model, pad_id=tok.pad_token_id)
    assert gap["logprob_gap_tokens"] == sum(len(c) for g in groups for c in g.completion_ids)
    assert gap["logprob_gap_max_abs"] <= 1e-6  # the same float32 computation on equal weights on both sides

    trainer_model.model.embed_tokens.weight.requires_grad_(False)
    gen(trainer_model, PROMPTS[:1], 1, SEEDS[:1])
    assert gen.last_sync["tensors"] == len(list(trainer_model.parameters())) - 1  # frozen: not sent again


def test_the_server_refuses_bad_requests_with_one_line(served):
    url, _ = served
    client = ServerClient(url, timeout_s=5)
    bad = generation_request(PROMPTS, 2, SEEDS, temperature=1.0, top_k=0, top_p=1.0, max_tokens=4, greedy=False)
    bad["seeds"] = [1]
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(bad).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400 and "seeds=[1]" in json.loads(err.value.read())["error"]
    with pytest.raises(ValueError, match="answered 400: load_weights body is not a safetensors file"):
        client._post("/load_weights", b"not a safetensors file", "application/octet-stream")
    with pytest.raises(ValueError, match=r"load_weights: 'model.nope.weight' is not a parameter"):
        client.load_weights([("model.nope.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="generate request field group_size=0"):
        generation_request(PROMPTS, 0, SEEDS, temperature=1.0, top_k=0, top_p=1.0, max_tokens=4, greedy=False)


def test_an_unreachable_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=rf"vllm_server_url='http://127.0.0.1:{port}' did not answer /health.*python -m llm.vllm_server"):
        ServerClient(f"http://127.0.0.1:{port}", timeout_s=0.3)
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        ServerClient("localhost:8000")


def test_lora_adapters_reach_the_engine_merged(tiny_dir):
    base, tok = _load(tiny_dir)
    lora = _lora(base, seed=1)
    served_model, _ = _load(tiny_dir)
    gen = VLLMGenerator(GenerationConfig(backend="vllm"), 1.0, 6, str(tiny_dir), "float32",
                        engine=TransformersEngine(served_model, tok, str(tiny_dir)))
    gen(lora, PROMPTS, 2, SEEDS)
    merged = copy.deepcopy(lora).merge_and_unload()
    for name, p in merged.named_parameters():
        torch.testing.assert_close(dict(served_model.named_parameters())[name], p, rtol=0,
                                   atol=4 * EPS32 * float(p.abs().max()), msg=name)
    # the engine's log-probs (merged weights) vs the trainer's (peft's unmerged forward W·x + s·B·A·x): float32
    # rounding of the two association orders, ~1e-6 relative on logits of order 1
    assert gen.logprob_gap(lora, pad_id=tok.pad_token_id)["logprob_gap_max_abs"] <= 1e-4
    gen(lora, PROMPTS[:1], 1, SEEDS[:1])
    assert gen.last_sync["tensors"] == 3  # one layer, three adapted projections: the only weights training changes


def test_a_training_run_through_the_server_equals_the_transformers_backend(tiny_dir, tmp_path, served):
    """Two steps of the tiny recipe: the server engine holds the trainer's weights of the start of each step and samples
    what the transformers backend samples, so every logged figure is the same."""
    url, engine = served
    reference = Trainer(tiny_recipe(tiny_dir, tmp_path / "ref"))
    ours = Trainer(tiny_recipe(tiny_dir, tmp_path / "ours"))
    spec = GenerationConfig(backend="vllm", vllm_mode="server", vllm_server_url=url)
    ours.generate = VLLMGenerator(spec, ours.method.temperature, ours.training.max_new_tokens, str(tiny_dir), "float32")
    rows_ref, rows_ours = [reference.step(0)], [ours.step(0)]
    after_first = {n: p.detach().clone() for n, p in ours.unwrapped.named_parameters()}
    rows_ref.append(reference.step(1))
    rows_ours.append(ours.step(1))
    served_params = dict(engine.model.named_parameters())
    assert all(torch.equal(served_params[n], p) for n, p in after_first.items())  # synced at the start of step 1
    assert any(not torch.equal(served_params[n], p) for n, p in ours.unwrapped.named_parameters())  # then it trained on
    for ref, got in zip(rows_ref, rows_ours):
        for key in ("reward", "loss", "entropy", "divergence", "response_length", "grad_norm"):
            assert got[key] == ref[key] or (math.isnan(got[key]) and math.isnan(ref[key])), key
    assert sample_seed(1, 2) != sample_seed(2, 1)  # the per-completion streams differ by prompt and index


# ------------------------------------------------------------------------------------------- recipe fields
def _generation(**fields) -> GenerationConfig:
    spec = GenerationConfig(**fields)
    spec.validate()
    return spec


@pytest.mark.parametrize("fields,message", [
    ({"backend": "vllm", "vllm_mode": "remote"}, r"generation.vllm_mode='remote' is not allowed; choose one of 'colocate', 'server'"),
    ({"vllm_mode": "server"}, r"generation.vllm_mode='server' needs generation.backend: vllm"),
    ({"backend": "vllm", "vllm_mode": "server", "vllm_server_url": "localhost:8000"}, r"vllm_server_url='localhost:8000' must start with http"),
    ({"backend": "vllm", "vllm_server_url": "http://h:1"}, r"vllm_server_url='http://h:1' is only read with generation.backend: vllm and vllm_mode: server"),
    ({"backend": "vllm", "vllm_mode": "server", "vllm_server_timeout": 0}, r"vllm_server_timeout=0 must be a number in \(0.0"),
    ({"logprob_gap_every": 2}, r"logprob_gap_every=2 is only read with generation.backend: vllm"),
    ({"backend": "vllm", "logprob_gap_every": -1}, r"logprob_gap_every=-1 must be an integer ≥ 0"),
])
def test_bad_vllm_fields_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        _generation(**fields)


def test_vllm_with_lora_is_a_valid_recipe_now():
    recipe = Recipe.from_dict({"model": {"lora": {"r": 8}}, "generation": {"backend": "vllm", "vllm_mode": "server",
                                                                          "vllm_server_url": "http://gpu-node:8000"}})
    assert recipe.generation.vllm_server_url == "http://gpu-node:8000" and recipe.model.lora.r == 8


def test_colocate_without_vllm_is_a_clear_error(tiny_dir):
    try:
        import vllm  # noqa: F401  (optional package)
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="needs the vllm package, which is not installed"):
        VLLMGenerator(GenerationConfig(backend="vllm"), 1.0, 4, str(tiny_dir), "float32")


# ------------------------------------------------------------------------------------------- FSDP2 shards (two processes)
FSDP2_HARNESS = '''
import sys
import torch
import peft
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from llm.generation import iter_sync_weights

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
if sys.argv[3] == "lora":
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
full = dict(iter_sync_weights(model))  # before sharding: the reference
full = {n: t.clone() for n, t in full.items()}
layers = model.base_model.model.model.layers if sys.argv[3] == "lora" else model.model.layers
for layer in layers:
    fully_shard(layer)
fully_shard(model)
sharded = sum(hasattr(p, "full_tensor") for p in model.parameters())
synced = {n: t.clone() for n, t in iter_sync_weights(model)}
changed = [n for n, _ in iter_sync_weights(model, changed_only=True)]
torch.save({"full": full, "synced": synced, "changed": changed, "sharded": sharded}, f"{sys.argv[2]}/rank{rank}.pt")
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp2_shards_are_gathered_one_parameter_at_a_time(tiny_dir, tmp_path, kind):
    """Two gloo processes shard the tiny model with FSDP2 (``fully_shard`` per layer and at the root, as accelerate's
    plugin does); both iterate the sync (its gathers are collectives) and get the unsharded model's weights."""
    script = tmp_path / "harness.py"
    script.write_text(FSDP2_HARNESS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tiny_dir), str(tmp_path), kind]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["sharded"] > 0  # the parameters really were DTensor shards
        assert list(out["synced"]) == list(out["full"])
        for name, tensor in out["full"].items():
            torch.testing.assert_close(out["synced"][name], tensor, rtol=0, atol=0, msg=name)  # same values, gathered
        if kind == "lora":
            assert sorted(out["changed"]) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_a_server_mode_recipe_trains_without_vllm_installed_and_logs_the_logprob_gap(tiny_dir, tmp_path, served):
    """The trainer's side of server mode needs no vLLM; with logprob_gap_every the engine's log-probabilities of its
    samples are compared with the trainer's each step. The engine was synced to the trainer's weights at the start of
    the step, so the gap is float32 rounding only: both sides compute a log-softmax of the same float32 logits (hidden
    32: 32-term dot products, ~10-nat magnitudes) in different batch shapes, a few ulps of 10 nats ≈ 1e-5; bound 1e-4."""
    url, _ = served
    recipe = tiny_recipe(tiny_dir, tmp_path / "run", generation__backend="vllm", generation__vllm_mode="server",
                         generation__vllm_server_url=url, generation__logprob_gap_every=1)
    trainer = Trainer(recipe)
    row = trainer.step(0)
    assert row["logprob_gap_tokens"] > 0 and row["logprob_gap_max_abs"] < 1e-4
