"""Sampling a group of completions per prompt: ``model.generate`` (default) or vLLM (optional).

Each prompt's group is sampled with its own seed, derived from ``(run seed, step, global prompt
index)``, so a batch split across processes samples exactly what one process would, and a resumed
run samples what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .recipe import GenerationSpec


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


class TransformersGenerator:
    """``model.generate`` with the method's temperature; one call per prompt group."""

    def __init__(self, spec: GenerationSpec, temperature: float, max_new_tokens: int, tokenizer, synced_gpus: bool = False):
        self.spec, self.temperature, self.max_new_tokens = spec, temperature, max_new_tokens
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.synced_gpus = synced_gpus  # FSDP / ZeRO-3: every rank must run the same number of forwards

    @torch.no_grad()
    def __call__(self, model, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int]) -> list[Group]:
        """Sample ``group_size`` completions for each prompt (``prompts`` are token id lists)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        groups = []
        try:
            for ids, seed in zip(prompts, seeds):
                torch.manual_seed(seed)
                input_ids = torch.tensor([ids], device=device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=self.temperature,
                    top_p=self.spec.top_p,
                    top_k=self.spec.top_k or None,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=group_size,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                    synced_gpus=self.synced_gpus,
                )
                groups.append(Group(list(ids), [strip_completion(row.tolist(), self.eos_id, self.pad_id) for row in out[:, len(ids):]]))
        finally:
            model.train(was_training)
        return groups


def strip_completion(ids: list[int], eos_id: Optional[int], pad_id: Optional[int]) -> list[int]:
    """Cut a generated row after its first eos (kept) and drop padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return [t for t in ids if t != pad_id] if pad_id is not None and pad_id != eos_id else ids


class VLLMGenerator:
    """vLLM sampling on the local GPU, weights pushed from the trainer before each step.

    Written against vLLM's offline ``LLM`` API; it is not exercised by the CPU test suite.
    """

    def __init__(self, spec: GenerationSpec, temperature: float, max_new_tokens: int, model_path: str, dtype: str):
        vllm = require_vllm()
        self.vllm = vllm
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=spec.vllm_gpu_memory_utilization,
                            enable_prefix_caching=True)
        self.spec, self.temperature, self.max_new_tokens = spec, temperature, max_new_tokens

    def load_weights(self, named_tensors) -> None:
        """Copy the trainer's current weights into the vLLM engine."""
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(named_tensors)

    def __call__(self, model, prompts: Sequence[list[int]], group_size: int, seeds: Sequence[int]) -> list[Group]:
        params = [self.vllm.SamplingParams(n=group_size, temperature=self.temperature, top_p=self.spec.top_p,
                                           top_k=self.spec.top_k or -1, max_tokens=self.max_new_tokens, seed=s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [Group(list(p), [list(c.token_ids) for c in o.outputs]) for p, o in zip(prompts, outs)]
