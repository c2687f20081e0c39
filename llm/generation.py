"""Sampling a group of completions per prompt: ``model.generate`` (default) or vLLM (optional).

Completion ``j`` of prompt ``i`` is sampled from its own random stream, seeded by
``sample_seed(seeds[i], j)`` where ``seeds[i]`` comes from ``(run seed, step, global prompt index)``. What a
row samples therefore does not depend on which other prompts share its batch: a batch split across
processes samples what one process would, and a resumed run samples what the uninterrupted one did. With
the transformers backend all prompts of a process go through one batched ``model.generate`` call, so this
holds up to floating-point rounding of batched vs unbatched forwards (padding, matmul shapes): a token can
differ only where two candidates are within rounding of an exact tie in ``logits + Gumbel noise``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .recipe import GenerationConfig

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


def require_vllm():
    """Import vLLM or fail with a clear message."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError(
            "generation.backend='vllm' needs the vllm package, which is not installed; install it on a GPU "
            "machine (`pip install vllm`) or set generation.backend: transformers"
        ) from None
    return vllm


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


class VLLMGenerator:
    """vLLM sampling on the local GPU, weights pushed from the trainer before each step.

    Written against vLLM's offline ``LLM`` API; it is not exercised by the CPU test suite.
    """

    def __init__(self, spec: GenerationConfig, temperature: float, max_new_tokens: int, model_path: str, dtype: str):
        vllm = require_vllm()
        self.vllm = vllm
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=spec.vllm_gpu_memory_utilization,
                            enable_prefix_caching=True)
        self.spec, self.temperature, self.max_new_tokens = spec, temperature, max_new_tokens

    def load_weights(self, named_tensors) -> None:
        """Copy the trainer's current weights into the vLLM engine."""
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(named_tensors)

    def __call__(self, model, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int], *, greedy: bool = False) -> list[Group]:
        params = [self.vllm.SamplingParams(n=group_size, temperature=0.0 if greedy else self.temperature, top_p=self.spec.top_p,
                                           top_k=self.spec.top_k or -1, max_tokens=self.max_new_tokens, seed=s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [Group(list(p), [list(c.token_ids) for c in o.outputs]) for p, o in zip(prompts, outs)]
