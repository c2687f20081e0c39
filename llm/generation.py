"""Sampling a group of completions per prompt: ``model.generate`` (default) or vLLM (optional).

Completion ``j`` of prompt ``i`` is sampled from its own random stream, seeded by
``sample_seed(seeds[i], j)`` where ``seeds[i]`` comes from ``(run seed, step, global prompt index)``. What a
row samples therefore does not depend on which other prompts share its batch: a batch split across
processes samples what one process would, and a resumed run samples what the uninterrupted one did. With
the transformers backend all prompts of a process go through one batched ``model.generate`` call, so this
holds up to floating-point rounding of batched vs unbatched forwards (padding, matmul shapes): a token can
differ only where two candidates are within rounding of an exact tie in ``logits + Gumbel noise``.

vLLM (``generation.backend: vllm``, after TRL's two modes, ``generation.vllm_mode``):

- ``colocate``: a vLLM engine inside each training process, on that process's GPU (:class:`VLLMEngine`, built with
  vLLM's ``external_launcher`` executor, which keeps the model in this process so weights can be written into it);
- ``server``: one ``python -m llm.vllm_server`` process on GPUs of its own, reached over HTTP (:class:`ServerClient`).

Before every call, :class:`VLLMGenerator` pushes the trainer's current weights into the engine
(:func:`iter_sync_weights`: one tensor at a time, gathered from FSDP2/ZeRO-3 shards one at a time, LoRA adapters
merged into their base weights; after the first sync only what training changes). The engine returns each sampled
token's log-probability, and :func:`logprob_gap` compares it with the trainer's own (:func:`completion_logprobs`):
the check that the engine samples from the policy being trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import safetensors.torch
import torch

from .batch import pack_rows
from .models import completion_outputs
from .recipe import DEFAULT_VLLM_SERVER_URL, GenerationConfig

# random streams of sample_seed(run seed, step, stream, ...): the prompts of a step, its samples, its feedback
# noise, and the evaluation's prompts and samples (EVAL never depends on the step: every evaluation sees the same prompts)
PROMPTS, GENERATION, FEEDBACK, EVAL = 0, 1, 2, 3


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Group:
    """``G`` sampled completions of one prompt (token ids without padding, eos kept if sampled)."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling logits ``[rows, V]``: ``logits / temperature``, then the top-k and top-p filters (dropped: -inf).

    top-k (0 = off) keeps the ``top_k`` largest (ties with the k-th kept too); top-p (1.0 = off) then keeps the
    smallest set of most probable tokens whose probability under ``softmax`` of what is left reaches ``top_p``
    (a token is kept iff the mass of the tokens ranked above it is < ``top_p``; the top token always is).
    """
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[..., -1:], -math.inf)
    if top_p < 1.0:
        ranked, order = z.sort(dim=-1, descending=True)
        p = ranked.softmax(-1)
        drop_ranked = p.cumsum(-1) - p >= top_p  # mass ranked above each token
        z = z.masked_fill(drop_ranked.scatter(-1, order, drop_ranked), -math.inf)
    return z


class GumbelSampler:
    """Turns greedy decoding into exact sampling from ``softmax(warp(logits))``, one random stream per row.

    ``y = argmax_v (warp(logits)_v + g_v)``, ``g_v = -log(-log U_v)``, ``U_v ~ Uniform(0, 1)`` i.i.d.: the Gumbel-max
    trick, an exact draw from ``softmax(warp(logits))``. Row ``r`` draws its ``V`` uniforms per step from
    ``torch.Generator`` seeded ``seeds[r]``, so its tokens depend on its own logits and seed only.
    A transformers logits processor by interface (``(input_ids, scores) -> scores``), not by subclass, so that
    importing this module does not import transformers.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.seeds, self.temperature, self.top_k, self.top_p = list(seeds), temperature, top_k, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores`` ``[rows, V]`` -> perturbed warped scores ``[rows, V]`` whose argmax is the sampled token."""
        rows, vocab = scores.shape
        if rows != len(self.seeds):
            raise ValueError(f"GumbelSampler got {rows} rows of scores for {len(self.seeds)} seeds")
        if not self.generators:  # on the device of the scores, made at the first step
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        # float64 uniforms: float32's 2**-24 grid would cap g at 16.6, so a token 21 nats below the best could never win
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))
        return warp_logits(scores, self.temperature, self.top_k, self.top_p) + gumbel.to(scores.dtype)


class TransformersGenerator:
    """``model.generate`` with the method's temperature: one batched call for all prompts of the process."""

    def __init__(self, spec: GenerationConfig, temperature: float, max_new_tokens: int, tokenizer, synced_gpus: bool = False):
        self.spec, self.temperature, self.max_new_tokens = spec, temperature, max_new_tokens
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.synced_gpus = synced_gpus  # FSDP / ZeRO-3: every rank must run the same number of forwards

    @torch.no_grad()
    def __call__(self, model, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, greedy: bool = False) -> list[Group]:
        """Sample ``group_size`` completions for each prompt (``prompts`` are token id lists, one seed each).

        The prompts are left-padded into one ``[len(prompts) * group_size, width]`` batch, rows ordered
        ``[prompt0 x G, prompt1 x G, ...]``; decoding is greedy over :class:`GumbelSampler`'s perturbed logits
        (``greedy``: over the logits themselves, the argmax completion; the seeds are then unused).
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts; give exactly one seed per prompt")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer")
        if not prompts:
            return []
        device = next(model.parameters()).device
        width = max(len(ids) for ids in prompts)
        pad = next(t for t in (self.pad_id, self.eos_id, 0) if t is not None)  # masked out: any id will do
        rows = [ids for ids in prompts for _ in range(group_size)]
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        sampler = GumbelSampler([sample_seed(seed, j) for seed in seeds for j in range(group_size)],
                                self.temperature, self.spec.top_k, self.spec.top_p)
        from transformers import LogitsProcessorList

        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,  # greedy over GumbelSampler's output = sampling; HF adds no warpers of its own
                logits_processor=LogitsProcessorList([] if greedy else [sampler]),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                synced_gpus=self.synced_gpus,
            )
        finally:
            model.train(was_training)
        completions = [strip_completion(row, self.eos_id, self.pad_id) for row in out[:, width:].tolist()]
        return [Group(list(ids), completions[i * group_size:(i + 1) * group_size]) for i, ids in enumerate(prompts)]


def strip_completion(ids: list[int], eos_id: Optional[int], pad_id: Optional[int]) -> list[int]:
    """Cut a generated row after its first eos (kept) and drop padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return [t for t in ids if t != pad_id] if pad_id is not None and pad_id != eos_id else ids


# ----------------------------------------------------------------------------- vLLM (optional)

def require_vllm():
    """Import vLLM or fail with a clear message."""
    try:
        import vllm  # optional package, imported only with generation.backend=vllm
    except ImportError:
        raise ValueError(
            "generation.backend='vllm' needs the vllm package, which is not installed; install it on a GPU "
            "machine (`pip install vllm`) or set generation.backend: transformers"
        ) from None
    return vllm


# ---- weights: trainer names -> vLLM names, LoRA merged, gathered one tensor at a time

# wrappers torch and peft insert into parameter names (activation checkpointing, FSDP1, torch.compile, peft's
# trainable copy of a module-to-save); vLLM's ``model.load_weights`` knows the plain transformers names
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.", "modules_to_save.default.")
# parameters with no vLLM counterpart: LoRA factors (merged into their base weight) and peft's frozen original module
_UNSYNCED_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.",
                   ".original_module.")


def vllm_weight_name(name: str) -> Optional[str]:
    """The name vLLM's ``model.load_weights`` expects for the trainer parameter ``name``; ``None`` for a parameter that
    has no counterpart there (a LoRA factor, merged into its base weight by :func:`iter_sync_weights`, or peft's frozen
    original of a module-to-save). E.g. ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` →
    ``model.layers.0.self_attn.q_proj.weight``."""
    if any(part in f".{name}" for part in _UNSYNCED_PARTS):
        return None
    name = name.removeprefix("base_model.model.")
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.replace(".base_layer.", ".")


def _is_lora_layer(module) -> bool:
    """A peft LoRA layer (duck-typed, so that peft need not be imported): a base layer and A/B factors per adapter."""
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


@contextlib.contextmanager
def _gathered(params: Sequence[torch.nn.Parameter]):
    """DeepSpeed ZeRO-3 partitions (``ds_id``) gathered for the block (a collective); anything else as it is."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # optional package, present whenever a parameter is a ZeRO-3 partition

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: an FSDP2 ``DTensor`` shard is gathered (a collective), others as they are."""
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


def merged_lora_weight(layer) -> torch.Tensor:
    """A peft LoRA layer's effective weight ``W + Σ_a s_a · B_a A_a`` over its active adapters ``a``
    (``s_a = alpha / r``, transposed for ``fan_in_fan_out`` layers), computed in float32 and returned in ``W``'s dtype,
    ``[out, in]``; the layer itself is not modified (peft's ``merge_adapter`` would write into it)."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    factors = [p for a in adapters for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
    with _gathered([layer.base_layer.weight, *factors]):
        w = _full(layer.base_layer.weight)
        merged = w.to(torch.float32, copy=True)  # never a view of the layer's own weight
        for a in adapters:
            delta = (_full(layer.lora_B[a].weight).float() @ _full(layer.lora_A[a].weight).float()) * layer.scaling[a]
            merged += delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return merged.to(w.dtype)


@torch.no_grad()
def iter_sync_weights(model: torch.nn.Module, *, changed_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights as ``(vLLM name, full tensor)``, one tensor at a time (never a whole state dict).

    LoRA layers yield their merged weight (:func:`merged_lora_weight`) under the base weight's name, and no factors.
    A sharded parameter is gathered when it is reached (FSDP2 ``full_tensor``, ZeRO-3 ``GatheredParameters``): a
    collective, so every process must iterate to the end, in the same order. A yielded tensor is only valid until the
    next one is requested (a ZeRO-3 gather is released then): use or copy it at once. Tied weights come once
    (``named_parameters`` skips duplicates; vLLM ties them itself). ``changed_only``: only what an optimiser step can
    change — trainable parameters and LoRA-merged weights — for every sync after the first.
    """
    lora = {name: m for name, m in model.named_modules() if _is_lora_layer(m)}
    for name, param in model.named_parameters():
        owner = name.rsplit(".base_layer.", 1)[0] if name.endswith(".base_layer.weight") else None
        if owner in lora:
            yield vllm_weight_name(name), merged_lora_weight(lora[owner])
            continue
        target = vllm_weight_name(name)
        if target is None or (changed_only and not param.requires_grad):
            continue
        with _gathered([param]):
            yield target, _full(param)


def weight_buckets(weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int,
                   dtype: Optional[torch.dtype] = None) -> Iterator[dict[str, torch.Tensor]]:
    """CPU copies of ``weights`` (cast to ``dtype`` if given) grouped into dicts of at most ``max_bytes`` each
    (a single larger tensor makes a bucket of its own), in order; what one HTTP request carries."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"weight_buckets: max_bytes={max_bytes!r} must be a positive integer")
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in weights:
        cpu = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype, copy=True).contiguous()
        nbytes = cpu.numel() * cpu.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = cpu
        size += nbytes
    if bucket:
        yield bucket


# ---- log-probabilities: the trainer's vs the engine's, of the same sampled tokens

@torch.no_grad()
def completion_logprobs(model, prompts: Sequence[list[int]], completions: Sequence[list[int]], *, temperature: float,
                        top_k: int = 0, top_p: float = 1.0, pad_id: int = 0, batch_size: int = 8) -> list[list[float]]:
    """``log softmax(warp(logits))[y_t]`` of every completion token under ``model`` (the trainer's side of the check),
    one list per completion; ``warp`` is :func:`warp_logits` at the sampling settings, i.e. the distribution the token
    was sampled from (what vLLM returns with ``logprobs_mode="processed_logprobs"``). ``completions[i]`` continues
    ``prompts[i]``; rows go through the model ``batch_size`` at a time (``[batch, T, V]`` float32 logits each)."""
    if len(prompts) != len(completions):
        raise ValueError(f"completion_logprobs: {len(prompts)} prompts for {len(completions)} completions; give one prompt per completion")
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for s in range(0, len(prompts), batch_size):
        rows, comps = list(prompts[s:s + batch_size]), list(completions[s:s + batch_size])
        width = max(len(c) for c in comps)
        if width == 0:
            out += [[] for _ in comps]
            continue
        ids, mask = pack_rows(rows, comps, pad_id, device)
        tokens, _ = pack_rows([[]] * len(comps), comps, pad_id, device)
        logits = completion_outputs(model, ids, mask, width, hidden=False).float()
        logp = warp_logits(logits, temperature, top_k, top_p).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        out += [logp[i, :len(c)].tolist() for i, c in enumerate(comps)]
    return out


def logprob_gap(trainer_logprobs: Sequence[Sequence[float]], engine_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """How far the engine's log-probabilities of the sampled tokens are from the trainer's, ``d_t = e_t − r_t`` over all
    tokens of all completions: ``logprob_gap_mean_abs`` = mean |d|, ``logprob_gap_max_abs`` = max |d|,
    ``logprob_gap_mean`` = mean d (> 0: the engine finds its samples likelier than the trainer does), over the tokens
    where both are finite (``logprob_gap_tokens``; the others are counted in ``logprob_gap_nonfinite``). 0 when the
    engine samples from exactly the trainer's distribution; bf16 kernels give a few hundredths of a nat."""
    if len(trainer_logprobs) != len(engine_logprobs):
        raise ValueError(f"logprob_gap: {len(trainer_logprobs)} trainer completions vs {len(engine_logprobs)} engine "
                         "completions; both must list the same completions")
    for i, (r, e) in enumerate(zip(trainer_logprobs, engine_logprobs)):
        if len(r) != len(e):
            raise ValueError(f"logprob_gap: completion {i} has {len(r)} trainer log-probs and {len(e)} engine log-probs; "
                             "both must cover the same tokens")
    ref = torch.tensor([x for row in trainer_logprobs for x in row], dtype=torch.float64)
    eng = torch.tensor([x for row in engine_logprobs for x in row], dtype=torch.float64)
    finite = ref.isfinite() & eng.isfinite()
    d = (eng - ref)[finite]
    n = int(d.numel())
    return {"logprob_gap_mean_abs": float(d.abs().mean()) if n else math.nan,
            "logprob_gap_max_abs": float(d.abs().max()) if n else math.nan,
            "logprob_gap_mean": float(d.mean()) if n else math.nan,
            "logprob_gap_tokens": n, "logprob_gap_nonfinite": int((~finite).sum())}


# ---- engines: generate(...) and load_weights(...) behind one interface

def generation_request(prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, temperature: float,
                       top_k: int, top_p: float, max_tokens: int, greedy: bool) -> dict[str, Any]:
    """The arguments of ``engine.generate`` as one checked JSON-able mapping (what ``/generate`` receives); raises
    ``ValueError`` naming the first bad field."""
    req = {"prompts": [list(map(int, p)) for p in prompts], "group_size": group_size, "seeds": list(seeds),
           "temperature": temperature, "top_k": top_k, "top_p": top_p, "max_tokens": max_tokens, "greedy": greedy}
    return parse_generation_request(req)


def parse_generation_request(req: Any) -> dict[str, Any]:
    """Check a ``/generate`` request body; returns it. ``ValueError`` names the first field that is wrong and what is allowed."""
    def bad(field: str, allowed: str):
        raise ValueError(f"generate request field {field}={req.get(field)!r} is wrong: {allowed}")

    if not isinstance(req, dict):
        raise ValueError(f"generate request must be a JSON object, got {type(req).__name__}")

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, list) and p and all(is_int(t) and t >= 0 for t in p) for p in prompts):
        bad("prompts", "a list of non-empty lists of token ids ≥ 0")
    if not is_int(req.get("group_size")) or req["group_size"] < 1:
        bad("group_size", "an integer ≥ 1")
    if not isinstance(req.get("seeds"), list) or len(req["seeds"]) != len(prompts) or not all(is_int(s) for s in req["seeds"]):
        bad("seeds", f"a list of {len(prompts)} integers, one per prompt")
    if not isinstance(req.get("temperature"), (int, float)) or isinstance(req["temperature"], bool) or not req["temperature"] > 0:
        bad("temperature", "a number > 0")
    if not is_int(req.get("top_k")) or req["top_k"] < 0:
        bad("top_k", "an integer ≥ 0 (0: off)")
    if not isinstance(req.get("top_p"), (int, float)) or isinstance(req["top_p"], bool) or not 0 < req["top_p"] <= 1:
        bad("top_p", "a number in (0, 1]")
    if not is_int(req.get("max_tokens")) or req["max_tokens"] < 1:
        bad("max_tokens", "an integer ≥ 1")
    if not isinstance(req.get("greedy"), bool):
        bad("greedy", "true or false")
    return req


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """A vLLM engine in this process, on this process's GPU: the ``colocate`` mode, and what ``llm.vllm_server`` serves.

    Built with ``distributed_executor_backend="external_launcher"`` (as TRL's colocate mode): vLLM then runs its worker
    in this process instead of a child process, so ``load_weights`` can write into the model it serves. That executor
    reads the torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``), set here for a
    single process. Every process of a run builds its own engine (tensor parallel size 1) and samples its own prompts.
    ``logprobs_mode="processed_logprobs"``: the returned log-probs are those of the warped distribution sampled from.
    Not exercised by the CPU test suite (vLLM needs a GPU).
    """

    every_rank = True  # each process loads weights into its own engine

    def __init__(self, model_path: str, dtype: str, *, gpu_memory_utilization: float, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = 4096, enforce_eager: bool = False):
        vllm = require_vllm()
        rank, world = _rank_world()
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(rank % max(1, torch.cuda.device_count())))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.vllm, self.model_path, self.dtype = vllm, model_path, dtype
        # max_num_batched_tokens 4096 (TRL's choice): vLLM's memory profiler would otherwise reserve activations for
        # 32k-token batches out of the share a colocated engine gets beside the training state
        kwargs = {} if max_num_batched_tokens is None else {"max_num_batched_tokens": max_num_batched_tokens}
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enable_prefix_caching=True, seed=rank,
                            distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs",
                            enforce_eager=enforce_eager, **kwargs)

    def info(self) -> dict[str, Any]:
        return {"engine": "vllm", "version": getattr(self.vllm, "__version__", None), "model": self.model_path, "dtype": self.dtype}

    def _model(self):
        try:  # reachable only with the in-process executor (external_launcher)
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as err:
            raise RuntimeError(f"vLLM {getattr(self.vllm, '__version__', '?')} keeps its model elsewhere than "
                               f"llm_engine.model_executor.driver_worker.model_runner.model ({err}); weights cannot be "
                               "synced with this version (TRL supports vLLM 0.22-0.31)") from None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write ``weights`` (vLLM names) into the served model, one tensor at a time, then drop the prefix cache
        (its keys and values were computed with the old weights)."""
        self._model().load_weights(weights=weights)
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, temperature: float,
                 top_k: int, top_p: float, max_tokens: int, greedy: bool) -> tuple[list[list[int]], list[list[float]]]:
        """``group_size`` completions per prompt, ordered ``[p0 × G, p1 × G, ...]``, completion ``j`` of prompt ``i``
        seeded ``sample_seed(seeds[i], j)`` (one request each; the prefix cache runs the prompt once); with their
        sampled tokens' log-probs."""
        params = [self.vllm.SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                                           max_tokens=max_tokens, seed=sample_seed(s, j), logprobs=0, detokenize=False)
                  for s in seeds for j in range(group_size)]
        rows = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(group_size)]
        outs = self.llm.generate(rows, sampling_params=params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outs:
            c = out.outputs[0]
            completions.append(list(c.token_ids))
            logprobs.append([math.nan if lp is None else float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs or [None] * len(c.token_ids))])
        return completions, logprobs


class TransformersEngine:
    """The engine interface served by a transformers model (no vLLM): it samples exactly what the transformers backend
    samples (:class:`TransformersGenerator`) and returns :func:`completion_logprobs`. For the CPU tests of the weight
    sync and the server, the GPU check's dry run, and ``python -m llm.vllm_server --engine transformers``."""

    every_rank = True

    def __init__(self, model, tokenizer, model_path: str = ""):
        self.model, self.tokenizer, self.model_path = model, tokenizer, model_path
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def info(self) -> dict[str, Any]:
        return {"engine": "transformers", "model": self.model_path, "dtype": self.dtype}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"load_weights: {name!r} is not a parameter of the served model {self.model_path!r}; "
                                 f"its parameters are named like {next(iter(params))!r}")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"load_weights: {name!r} has shape {tuple(tensor.shape)}, the served model's "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)

    def generate(self, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, temperature: float,
                 top_k: int, top_p: float, max_tokens: int, greedy: bool) -> tuple[list[list[int]], list[list[float]]]:
        spec = GenerationConfig(top_k=top_k, top_p=top_p)
        groups = TransformersGenerator(spec, temperature, max_tokens, self.tokenizer)(self.model, prompts, group_size, seeds, greedy=greedy)
        completions = [c for g in groups for c in g.completion_ids]
        rows = [p for p in prompts for _ in range(group_size)]
        if greedy:
            return completions, [[math.nan] * len(c) for c in completions]
        pad = self.tokenizer.pad_token_id or 0
        return completions, completion_logprobs(self.model, rows, completions, temperature=temperature, top_k=top_k,
                                                top_p=top_p, pad_id=pad)


class ServerClient:
    """The ``server`` mode's engine: a ``python -m llm.vllm_server`` process reached over HTTP (JSON for generation,
    safetensors bytes for weights; standard library only, so the trainer needs neither vLLM nor a GPU-to-GPU link).
    One server serves every training process: only rank 0 sends weights (:attr:`every_rank` is False)."""

    every_rank = False
    bucket_bytes = 1 << 30  # weights per request: 1 GiB of tensors

    def __init__(self, url: str, *, timeout_s: float = 240.0, request_timeout_s: float = 3600.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"generation.vllm_server_url={url!r} must be an http:// or https:// URL")
        self.url, self.request_timeout_s = url.rstrip("/"), request_timeout_s
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=min(10.0, max(0.1, timeout_s))) as resp:
                    self.server_info = json.loads(resp.read())
                break
            except (urllib.error.URLError, OSError, ValueError) as err:
                last = err
            if time.monotonic() >= deadline:
                raise ValueError(f"generation.vllm_server_url={url!r} did not answer /health within {timeout_s:g} s ({last}); "
                                 "start the server first: python -m llm.vllm_server --model MODEL_DIR --port PORT")
            time.sleep(0.5)
        dtype = self.server_info.get("dtype")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else None

    def info(self) -> dict[str, Any]:
        return dict(self.server_info)

    def _post(self, path: str, body: bytes, content_type: str) -> Any:
        req = urllib.request.Request(f"{self.url}{path}", data=body, method="POST", headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", "")
            except ValueError:
                message = ""
            raise ValueError(f"vLLM server {self.url}{path} answered {err.code}: {message or err.reason}") from None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send ``weights`` in buckets of :attr:`bucket_bytes`, cast to the server's dtype on the way (halves the bytes
        of float32 master weights for a bf16 engine)."""
        for bucket in weight_buckets(weights, self.bucket_bytes, self.dtype):
            self._post("/load_weights", safetensors.torch.save(bucket), "application/octet-stream")

    def generate(self, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, temperature: float,
                 top_k: int, top_p: float, max_tokens: int, greedy: bool) -> tuple[list[list[int]], list[list[float]]]:
        req = generation_request(prompts, group_size, seeds, temperature=temperature, top_k=top_k, top_p=top_p,
                                 max_tokens=max_tokens, greedy=greedy)
        out = self._post("/generate", json.dumps(req).encode(), "application/json")
        return out["completions"], [[math.nan if x is None else x for x in row] for row in out["logprobs"]]


class VLLMGenerator:
    """vLLM sampling (``generation.backend: vllm``), the engine holding the trainer's current weights at every call.

    ``engine``: a :class:`VLLMEngine` (``vllm_mode: colocate``), a :class:`ServerClient` (``server``), or any object with
    their ``generate``/``load_weights``/``every_rank`` (e.g. :class:`TransformersEngine`). Called like
    :class:`TransformersGenerator`; completion ``j`` of prompt ``i`` is seeded ``sample_seed(seeds[i], j)`` (vLLM's own
    sampler: the same seed gives another token than the Gumbel sampler). ``last_sync`` holds the last sync's tensors,
    bytes and seconds; :meth:`logprob_gap` checks the last call's tokens against the trainer's log-probs.
    """

    def __init__(self, spec: GenerationConfig, temperature: float, max_new_tokens: int, model_path: str, dtype: str, *,
                 max_model_len: Optional[int] = None, engine: Any = None):
        self.spec, self.temperature, self.max_new_tokens = spec, temperature, max_new_tokens
        if engine is None and spec.vllm_mode == "server":
            engine = ServerClient(spec.vllm_server_url or DEFAULT_VLLM_SERVER_URL, timeout_s=spec.vllm_server_timeout)
        elif engine is None:
            engine = VLLMEngine(model_path, dtype, gpu_memory_utilization=spec.vllm_gpu_memory_utilization, max_model_len=max_model_len)
        self.engine = engine
        self.synced = False  # after the first (full) sync, only what training changes is sent
        self.last_sync: dict[str, float] = {}
        self.last: Optional[tuple[list[list[int]], list[list[int]], list[list[float]]]] = None

    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        """Push ``model``'s weights into the engine (:func:`iter_sync_weights`; everything the first time, then only what
        training changes). Every process must call it (gathers are collectives); with a shared server only rank 0 sends,
        and the others wait at a barrier until the server holds the new weights."""
        rank, world = _rank_world()
        send = self.engine.every_rank or rank == 0
        stats = {"tensors": 0, "bytes": 0}
        t0 = time.perf_counter()

        def counted():
            for name, tensor in iter_sync_weights(model, changed_only=self.synced):
                stats["tensors"] += 1
                stats["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        weights = counted()
        if send:
            self.engine.load_weights(weights)
        for _ in weights:  # whatever the engine did not read: the gathers still have to run on every process
            pass
        if not self.engine.every_rank and world > 1:
            torch.distributed.barrier()
        self.synced = True
        self.last_sync = {**stats, "seconds": time.perf_counter() - t0}
        return self.last_sync

    def __call__(self, model, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, greedy: bool = False) -> list[Group]:
        """Sync ``model``'s weights, then sample ``group_size`` completions per prompt (token id lists, one seed each)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts; give exactly one seed per prompt")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} must be a positive integer")
        self.sync_weights(model)  # before the early return: the gathers are collectives
        if not prompts:
            return []
        completions, logprobs = self.engine.generate(
            [list(p) for p in prompts], group_size, list(seeds), temperature=self.temperature, top_k=self.spec.top_k,
            top_p=self.spec.top_p, max_tokens=self.max_new_tokens, greedy=greedy)
        self.last = None if greedy else ([list(p) for p in prompts for _ in range(group_size)], completions, logprobs)
        return [Group(list(p), completions[i * group_size:(i + 1) * group_size]) for i, p in enumerate(prompts)]

    def logprob_gap(self, model, pad_id: int = 0) -> dict[str, float]:
        """:func:`logprob_gap` of the last sampled (not greedy) call: the engine's log-probs of its tokens vs ``model``'s."""
        if self.last is None:
            raise ValueError("VLLMGenerator.logprob_gap needs a sampled call first (greedy calls have no sampling distribution)")
        rows, completions, engine_lp = self.last
        ref = completion_logprobs(model, rows, completions, temperature=self.temperature, top_k=self.spec.top_k,
                                  top_p=self.spec.top_p, pad_id=pad_id)
        return logprob_gap(ref, engine_lp)
