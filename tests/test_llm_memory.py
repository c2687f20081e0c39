"""Memory, measured: the deterministic peak tracker (llm/memory_measure.py), the buffer counts and activation count the
plan uses (llm/memory_plan.py, each re-measured here), a training step at Qwen3's vocabulary that holds no logits
block larger than one chunk, and the plan's terms per strategy, LoRA, checkpointing, fused loss and generation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from llm_helpers import tiny_recipe
from transformers import Qwen3Config, Qwen3ForCausalLM

from llm.batch import Batch, pack_rows
from llm.cli import main as cli_main
from llm.generation import TransformersGenerator
from llm.losses import sdpo_loss, token_logprobs, token_stats
from llm.memory_measure import PeakMemory, build_real_vocab_model, real_vocab_tokenizer
from llm.memory_plan import (
    ENTROPY_BUFFERS,
    FUSED_BUFFERS,
    GEN_BUFFERS,
    GIB,
    LOGPROB_BUFFERS,
    STATS_BUFFERS,
    UNFUSED_BUFFERS,
    activation_bytes_per_token,
    format_plan,
    layer_parameter_count,
    memory_plan,
    parameter_count,
)
from llm.recipe import load_recipe, resolve_recipe_path
from llm.trainer import Trainer
from sdpo_sim.core.losses import default_chunk_size, fused_linear_sdpo_loss
from sdpo_sim.core.method import MethodConfig

QWEN3_VOCAB = 151936


# ----------------------------------------------------------------------------- the tracker
def test_peak_memory_counts_each_storage_once_and_frees_it():
    ext = torch.zeros(100)  # 400 bytes held before the block
    with PeakMemory(ext) as mem:
        a = torch.zeros(1000)  # 4000 B
        view = a[10:]  # a view: no new storage
        b = a * 2  # 4000 B: peak 400 + 8000
        del a, view  # the storage dies with its last reference
        c = torch.ones(500)  # 2000 B
        with mem.phase("small"):
            d = c + 1  # 2000 B
    assert mem.start_bytes == 400
    assert mem.peak_bytes == 400 + 8000
    assert mem.phases["small"] == 400 + 4000 + 2000 + 2000
    assert mem.end_bytes == 400 + 4000 + 2000 + 2000  # b, c, d still alive
    assert mem.largest_bytes == 4000 and mem.largest_shape == (1000,)
    del b, c, d

    def work():
        with PeakMemory() as m:
            x = torch.randn(64, 64, requires_grad=True)
            (x @ x).sum().backward()
        return m.peak_bytes

    assert work() == work()  # a sum of tensor sizes: the same number every time, on every machine
    with pytest.raises(ValueError, match="PeakMemory: cannot track a str"):
        PeakMemory("model").__enter__()


def test_peak_memory_sees_an_optimizer_and_module_gradients():
    model = torch.nn.Linear(32, 16)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    opt.step()  # moments: 2 × (32·16 + 16) float32
    params = (32 * 16 + 16) * 4
    with PeakMemory(model, opt) as mem:
        pass
    assert mem.start_bytes == params * 4 + 2 * 4  # weights, gradients, two moments, a float32 step count per tensor


# ----------------------------------------------------------------------------- the plan's measured counts
V, H, C, N = 4096, 4, 16, 64  # V·H and N·H are small against one [C, V] chunk; N spans 4 chunks


def _chunks(extra_bytes: float) -> float:
    return extra_bytes / (C * V * 4)


@pytest.mark.parametrize("support,alpha,topk", [("full", 1.0, None), ("full", 0.0, None), ("full", 0.5, None),
                                                ("topk", 1.0, 20), ("sampled", 1.0, None)])
def test_fused_loss_and_statistics_buffers_are_what_the_plan_counts(support, alpha, topk):
    torch.manual_seed(0)
    w = torch.randn(V, H, requires_grad=True)
    hs, ht = torch.randn(N, H, requires_grad=True), torch.randn(N, H)
    toks = torch.randint(0, V, (N,))
    with PeakMemory(w, hs, ht, toks) as mem:
        fused_linear_sdpo_loss(hs, ht, w, torch.ones(N, dtype=torch.bool), alpha=alpha, support=support, topk=topk,
                               chunk_size=C, tokens=toks)
    # what is not [C, V]: the float32 [V, H] and [N, H] gradients it keeps for backward, and [C, topk + 1]- and
    # [N]-sized scraps (top-k indices and values: ~10 alive, 10·16·21·8 B = 26 KiB, 0.1 of one 256 KiB chunk)
    fused = _chunks(mem.peak_bytes - mem.start_bytes - V * H * 4 - N * H * 4)
    key = ("full", alpha) if support == "full" and alpha in (0.0, 1.0) else (support, None)
    assert abs(fused - FUSED_BUFFERS[key]) < 0.1, fused
    with PeakMemory(w, hs, ht, toks) as mem:
        token_stats(hs.detach()[None], ht[None], toks[None], alpha, weight=w.detach(), chunk_size=C)
    stats = _chunks(mem.peak_bytes - mem.start_bytes - 3 * N * 4)  # minus its three [N] float32 outputs
    assert abs(stats - (2 + STATS_BUFFERS["kl" if alpha in (0.0, 1.0) else "mixed"])) < 0.1, stats  # + 2 logits chunks
    logits = torch.randn(1, N, V)
    with PeakMemory(logits, toks) as mem:
        token_stats(logits, None, toks[None], alpha, chunk_size=C)
    assert abs(_chunks(mem.peak_bytes - mem.start_bytes - 3 * N * 4) - ENTROPY_BUFFERS) < 0.1


def test_unfused_loss_and_log_probability_buffers_are_what_the_plan_counts():
    torch.manual_seed(0)
    B, T = 4, 16
    for (support, alpha), count in UNFUSED_BUFFERS.items():
        method = MethodConfig(name="sdpo", alpha=(0.5 if support == "full" else 1.0) if alpha is None else alpha,
                              support=support, topk=20 if support == "topk" else None)
        s, t = torch.randn(B, T, V, requires_grad=True), torch.randn(B, T, V)
        toks, mask = torch.randint(0, V, (B, T)), torch.ones(B, T)
        with PeakMemory(s, t, toks, mask) as mem:
            sdpo_loss(s, t, toks, mask, method, max_len=T)
        assert abs((mem.peak_bytes - mem.start_bytes) / (B * T * V * 4) - count) < 0.1, (support, alpha)
    w, hs = torch.randn(V, H, requires_grad=True), torch.randn(1, N, H, requires_grad=True)
    toks = torch.randint(0, V, (1, N))
    with PeakMemory(w, hs, toks) as mem:
        token_logprobs(hs, toks, w, chunk_size=C).sum().backward()
    # minus the two gradients it returns, [V, H] and [N, H] float32
    assert abs(_chunks(mem.peak_bytes - mem.start_bytes - V * H * 4 - N * H * 4) - LOGPROB_BUFFERS) < 0.1


def test_generation_holds_the_decoding_buffers_the_plan_counts(tmp_path):
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {"model.path": str(tmp_path)})
    tok = real_vocab_tokenizer(8192)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=8192, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    gen = TransformersGenerator(recipe.generation, 1.0, 3, tok)
    rows = 6  # 2 prompts × 3
    with PeakMemory(model) as mem:
        gen(model, [[5, 6, 7], [8, 9]], 3, [1, 2])
    # the rest (KV cache, activations) is below 1 % of one [rows, V] float32 buffer at hidden size 8
    assert abs((mem.peak_bytes - mem.start_bytes) / (rows * 8192 * 4) - GEN_BUFFERS) < 0.5


def _saved_bytes(cfg: Qwen3Config, dtype: torch.dtype, B: int, S: int, autocast: bool = False) -> int:
    """Bytes of the distinct non-parameter storages a forward saves for backward (padded batch: row 0 starts late);
    ``autocast``: float32 weights under bfloat16 autocast without its weight cache, as the trainer runs bfloat16."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=autocast):
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
              logits_to_keep=1, output_hidden_states=True)
    return sum(seen.values())


@pytest.mark.parametrize("dtype,kv_heads,autocast", [(torch.float32, 2, False), (torch.bfloat16, 2, False),
                                                     (torch.float32, 4, False), (torch.float32, 2, True)])
def test_activation_count_is_what_a_qwen3_layer_saves(dtype, kv_heads, autocast):
    B, S = 3, 20

    def cfg(layers):
        return Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=24, attn_implementation="sdpa")

    per_layer = _saved_bytes(cfg(2), dtype, B, S, autocast) - _saved_bytes(cfg(1), dtype, B, S, autocast)
    b = 4 if dtype == torch.float32 else 2
    # autocast also keeps a bfloat16 copy of each of the layer's matrices (norm weights are not cast)
    copies = 2 * (layer_parameter_count(cfg(1).to_dict()) - 2 * 64 - 2 * 24) if autocast else 0
    assert per_layer == B * S * activation_bytes_per_token(cfg(1).to_dict(), b, S, autocast=autocast) + copies  # exact


# ----------------------------------------------------------------------------- a step at Qwen3's vocabulary
@pytest.fixture(scope="module")
def qwen3_vocab_dir(tmp_path_factory):
    """Qwen3's architecture with its real vocabulary (151,936 ids) and tiny everything else: hidden 64, one layer."""
    return build_real_vocab_model(tmp_path_factory.mktemp("qwen3-vocab"), vocab_size=QWEN3_VOCAB, hidden_size=64, num_layers=1)


def _batch(pad: int, *, rows: int, prompt: int, context: int, completion: int) -> Batch:
    """A step's packed rollouts, as llm/rollout.py packs them, with random token ids instead of sampled ones (a
    batch of this size would take a minute to sample at this vocabulary on CPU): row 0's prompt, context and
    completion are one token shorter, so every block has padding; every row has a teacher context and a verdict."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int, i: int) -> list[int]:
        return torch.randint(200, QWEN3_VOCAB, (n - (i == 0),), generator=g).tolist()

    prompts, contexts, completions = ([ids(n, i) for i in range(rows)] for n in (prompt, context, completion))
    inp, mask = pack_rows(prompts, completions, pad, "cpu")
    t_inp, t_mask = pack_rows(contexts, completions, pad, "cpu")
    comp, comp_mask = pack_rows([[]] * rows, completions, pad, "cpu")
    return Batch(input_ids=inp, attention_mask=mask, teacher_input_ids=t_inp, teacher_attention_mask=t_mask,
                 completion_ids=comp, completion_mask=comp_mask.float(), distill_mask=torch.ones(rows),
                 judged=torch.ones(rows), advantages=torch.zeros(rows))


def test_a_step_holds_no_logits_block_larger_than_one_chunk(qwen3_vocab_dir, tmp_path):
    recipe = tiny_recipe(qwen3_vocab_dir, tmp_path / "out", training__prompts_per_step=2, method__num_generations=4,
                         training__max_new_tokens=128, training__max_prompt_length=32, context__max_context_tokens=64,
                         training__feedback_credit_every=0, training__share_prompt_prefix=False)
    trainer = Trainer(recipe)
    assert trainer.fused
    batch = _batch(trainer.tokenizer.pad_token_id, rows=8, prompt=32, context=64, completion=128)
    rows, T = batch.completion_ids.shape
    n_tok, Vq, Hq = rows * T, QWEN3_VOCAB, 64
    c = default_chunk_size(Vq)  # 55 rows: one [55, V] float32 chunk is 31.9 MiB
    assert n_tok > 8 * c  # many chunks
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    with PeakMemory(trainer.unwrapped, trainer.optimizer.optimizer, *trainer.teacher.weights.values(), *tensors) as mem:
        loss, _ = trainer.compute_loss(batch)
        trainer.acc.backward(loss)
    chunk, head = c * Vq * 4, Vq * Hq * 4
    # Budget above what is held (weights, teacher copy, batch), from the arithmetic of the step (llm/memory_plan.py):
    #   the teacher's LM-head clone [V, H] + the fused loss's float32 [V, H] gradient and, in backward, its copy
    #   for the weight: 3·V·H·4 = 111 MiB;
    #   the statistics' chunk: 2 logits chunks + 7 float32 buffers = 9 chunks = 287 MiB (the loss's own 6 chunks
    #   come after the statistics' are freed);
    #   activations of 8 rows × 160 tokens at hidden 64 (activation_bytes_per_token: ~5 KiB/token = 6.5 MiB), the
    #   [tokens, H] hidden states of teacher and student and their gradients (4 × 0.25 MiB): < 16 MiB together.
    budget = 3 * head + 9 * chunk + 16 * 2 ** 20
    assert mem.peak_bytes - mem.start_bytes <= budget
    assert n_tok * Vq * 4 > budget  # one [tokens, V] float32 block alone would not fit in the budget ...
    assert mem.largest_bytes <= max(head, chunk)  # ... and no block of logits was larger than one chunk
    # the plan's loss phase is this step's measured growth (same arithmetic; the plan adds no slack)
    plan = memory_plan(recipe, device="cpu", strategy="single", gpu_memory_gb=64.0)
    assert plan["peak_phase"] == "loss"
    assert abs(plan["phases"]["loss"]["total_gb"] * GIB / (mem.peak_bytes - mem.start_bytes) - 1) < 0.15

    # The previous statistics took chunks of min(tokens, 1024) rows: on only 128 of these tokens they already
    # need 9 float32 [128, V] buffers (700 MB), over the whole budget
    with torch.no_grad():
        hidden = trainer.unwrapped.model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1]).last_hidden_state
    student = hidden[:, -T - 1:-1][:, :128]
    w = trainer.unwrapped.get_output_embeddings().weight.detach()
    with PeakMemory(w, student) as old:
        token_stats(student, student + 0.1, batch.completion_ids[:1, :128], 1.0, weight=w, chunk_size=1024)
    assert old.peak_bytes - old.start_bytes > budget
    assert old.largest_bytes == student.shape[1] * Vq * 4  # a [tokens, V] block


def test_log_probabilities_from_hidden_states_stay_within_one_chunk():
    torch.manual_seed(0)
    Vq, Hq, n_tok = QWEN3_VOCAB, 8, 200
    c = default_chunk_size(Vq)
    w, hs = torch.randn(Vq, Hq, requires_grad=True), torch.randn(1, n_tok, Hq, requires_grad=True)
    toks = torch.randint(0, Vq, (1, n_tok))
    with PeakMemory(w, hs, toks) as mem:
        token_logprobs(hs, toks, w).sum().backward()
    assert mem.largest_bytes <= c * Vq * 4 < n_tok * Vq * 4


# ----------------------------------------------------------------------------- the plan's terms
def _qwen3_8b(**overrides):
    return load_recipe(resolve_recipe_path("qwen3-8b"), overrides)


def test_plan_of_qwen3_8b_has_the_terms_the_review_found_missing():
    recipe = _qwen3_8b()
    P = parameter_count({"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128})
    assert P == 8_190_735_360  # equal to a meta-device Qwen3ForCausalLM (issue 15)
    plan = memory_plan(recipe, gpus_per_node=8, gpu_memory_gb=80)
    # float32 weights, gradients, two moments and the EMA copy: 20 bytes per parameter over 8 GPUs = 19.07 GiB
    assert plan["weights_gb"] + plan["optimizer_gb"] + plan["teacher_gb"] + plan["gradients_gb"] == pytest.approx(20 * P / 8 / GIB)
    # KV cache of 32 rows × 4096 tokens: 2·36 layers·8 heads·128·2 B per token (+ one layer while it grows) ≈ 18.5 GiB
    assert plan["kv_cache_gb"] == pytest.approx(2 * 36 * 8 * 128 * 2 * 32 * 4096 * (1 + 1 / 36) / GIB)
    # the fused loss's float32 [V, H] gradient (2.32 GiB) is in the logits term
    assert plan["logits_gb"] >= 151936 * 4096 * 4 / GIB
    assert plan["micro_batches"] == 4 and plan["phases"]["loss"]["accumulated_gradients_gb"] == pytest.approx(plan["gradients_gb"])
    assert plan["fits"] and plan["overhead_gb"] == 3.0
    text = format_plan(plan)
    assert "<- peak" in text and "kv cache" in text and "fits" in text


def test_plan_terms_follow_strategy_lora_checkpointing_fusion_and_generation():
    recipe = _qwen3_8b()
    one = memory_plan(recipe, gpus_per_node=8, gpu_memory_gb=80)
    four = memory_plan(recipe, gpus_per_node=8, nodes=4, gpu_memory_gb=80)
    assert one["weights_gb"] / four["weights_gb"] == pytest.approx(4)  # FSDP2 shards over all 32 GPUs
    zero3 = memory_plan(recipe, gpus_per_node=8, gpu_memory_gb=80, strategy="zero3")
    # ZeRO-3's bf16 engine: bfloat16 partitions beside the float32 masters (6 bytes per parameter over 8 GPUs)
    assert zero3["weights_gb"] == pytest.approx(1.5 * one["weights_gb"]) and zero3["gathered_gb"] != one["gathered_gb"]
    ddp = memory_plan(recipe, gpus_per_node=8, gpu_memory_gb=80, strategy="ddp")
    assert ddp["weights_gb"] == pytest.approx(8 * one["weights_gb"]) and ddp["ddp_buckets_gb"] == pytest.approx(ddp["weights_gb"])
    assert not ddp["fits"] and "DOES NOT FIT" in format_plan(ddp)
    lora = memory_plan(_qwen3_8b(**{"model.lora": {"r": 64, "alpha": 128, "target_modules": ["q_proj", "v_proj"]}}),
                       gpus_per_node=8, gpu_memory_gb=80)
    assert lora["trainable"] == 36 * 64 * ((4096 + 4096) + (4096 + 1024))
    assert lora["optimizer_gb"] == pytest.approx(2 * lora["trainable"] * 4 / 8 / GIB) and lora["weights_gb"] == pytest.approx((one["parameters"] * 2 + lora["trainable"] * 4) / 8 / GIB)
    no_gc = memory_plan(_qwen3_8b(**{"model.gradient_checkpointing": False}), gpus_per_node=8, gpu_memory_gb=80)
    assert no_gc["activations_gb"] > 5 * one["activations_gb"]
    unfused = memory_plan(_qwen3_8b(**{"training.fused_loss": False}), gpus_per_node=8, gpu_memory_gb=80)
    # [8 rows, 2048 tokens, V] logits in bfloat16 + the top-k loss's 2 float32 buffers of that size: 23.2 GiB
    assert not unfused["fused_loss"] and unfused["logits_gb"] == pytest.approx(8 * 2048 * 151936 * (2 + 2 * 4) / GIB)
    live = memory_plan(_qwen3_8b(**{"method.teacher_kind": "live"}), gpus_per_node=8, gpu_memory_gb=80)
    assert live["teacher_gb"] == 0 and one["teacher_gb"] > 0
    vllm = memory_plan(_qwen3_8b(**{"generation.backend": "vllm"}), gpus_per_node=8, gpu_memory_gb=80)
    assert vllm["vllm_gb"] == pytest.approx(0.3 * 80) and vllm["kv_cache_gb"] == 0
    assert vllm["total_gb"] > one["total_gb"]


def test_plan_on_cpu_has_no_cuda_allowance_and_refuses_what_it_cannot_plan(tmp_path):
    model_dir = build_real_vocab_model(tmp_path / "m", vocab_size=1000, hidden_size=16, num_layers=1)
    recipe = load_recipe(resolve_recipe_path("tiny-cpu"), {"model.path": str(model_dir)})
    cpu = memory_plan(recipe, device="cpu", strategy="single", gpu_memory_gb=8)
    gpu = memory_plan(recipe, strategy="single", gpu_memory_gb=8)
    assert cpu["overhead_gb"] == 0 and gpu["total_gb"] - cpu["total_gb"] >= 3.0  # + CUDA allowance, foreach temporaries
    for kwargs, match in (({"device": "tpu"}, "device='tpu'"), ({"strategy": "zero9"}, "strategy='zero9'"),
                          ({"device": "cpu", "strategy": "fsdp2"}, "device='cpu' plans one process"),
                          ({"strategy": "single", "gpus_per_node": 2}, "strategy='single' plans one process"),
                          ({"micro_batch": 0}, "micro_batch=0")):
        with pytest.raises(ValueError, match=match):
            memory_plan(recipe, **{"gpu_memory_gb": 8, **kwargs})
    assert cli_main(["plan", "--recipe", "tiny-cpu", "--model.path", str(model_dir), "--gpus-per-node", "1",
                     "--gpu-memory-gb", "8", "--device", "cpu", "--strategy", "single"]) == 0
    assert cli_main(["plan", "--recipe", "tiny-cpu", "--model.path", str(model_dir), "--gpus-per-node", "1",
                     "--gpu-memory-gb", "8", "--device", "cpu"]) == 2  # fsdp2 on CPU: one line, exit 2


def test_docs_plan_example_is_the_output_of_the_code():
    spec = importlib.util.spec_from_file_location("render_plan", Path(__file__).resolve().parent.parent / "docs" / "render_plan.py")
    render_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_plan)
    text = render_plan.DOC.read_text()
    assert render_plan.BLOCK.search(text), "docs/llm.md has no plan example block"
    assert render_plan.render(text) == text, "docs/llm.md's plan example is stale: run `python docs/render_plan.py`"


def test_real_vocab_tokenizer_keeps_text_as_characters():
    tok = real_vocab_tokenizer(500)
    assert len(tok) == 500 and tok.decode(tok("ab c")["input_ids"]) == "ab c"
    assert tok.convert_ids_to_tokens(499).startswith("<|v")  # a filler id decodes as itself
    with pytest.raises(ValueError, match="vocab_size=5 must be an integer"):
        real_vocab_tokenizer(5)
