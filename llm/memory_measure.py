"""Peak memory of a piece of work, measured deterministically on any device (CPU included), and a tiny model with a
real vocabulary to measure it on.

:class:`PeakMemory` is a ``TorchDispatchMode``: every tensor an operator returns is counted once by its untyped
storage (``nbytes``: elements × element size), and a weak-reference callback on that storage subtracts it when the
storage dies. The peak is the largest sum of live storages seen after any operator, so it depends only on the
sequence of operators and their shapes: the same number on every machine (a test can assert on it). Tensors that
existed before the block count only when passed in (``external``: modules with their parameters, buffers and
gradients, optimisers with their state, tensors); what one ATen kernel allocates and frees inside itself (a matmul's
workspace) and the allocator's own slack are not seen — the resident set size is the place for those
(``benchmarks/bench_memory_plan.py`` reports both).

Why not torch's ``torch.distributed._tools.mem_tracker.MemTracker``, which counts the same way: it refuses a second
forward of the root module inside one tracked block ("does not support memory tracking for multiple iterative
calls"), and a training step forwards the model many times (each generated token, the teacher, the student).
"""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from tokenizers import Tokenizer, decoders, models
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .tiny import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer, save_pretrained_dir

MIB = 1024 ** 2
GIB = 1024 ** 3


def _external_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors an external object holds: a module's parameters, their gradients and its buffers; an optimiser's
    state; a tensor itself; lists, tuples and dicts of those."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        params = list(obj.parameters())
        return params + [p.grad for p in params if p.grad is not None] + list(obj.buffers())
    if isinstance(obj, torch.optim.Optimizer):
        return [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if isinstance(obj, (list, tuple, dict)):
        leaves, _ = tree_flatten(obj)
        return [t for leaf in leaves for t in _external_tensors(leaf)]
    if obj is None:
        return []
    raise ValueError(f"PeakMemory: cannot track a {type(obj).__name__}; pass modules, optimizers, tensors or lists/dicts of them")


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory(model, optimizer, *tensors) as mem: work()``; then ``mem.peak_bytes`` (the most live tensor
    storage at any point, externals included), ``mem.start_bytes`` (the externals at entry), ``mem.end_bytes``,
    ``mem.peak_op`` (the operator whose output reached the peak), ``mem.largest_bytes`` / ``mem.largest_shape`` (the
    largest single storage created inside) and ``mem.phases`` (see :meth:`phase`).

    Deterministic: a sum of tensor sizes (see the module docstring), not a reading of the allocator or the operating
    system. Counts storages on ``device`` only (default CPU)."""

    def __init__(self, *external: Any, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.external = external
        self.start_bytes = self.peak_bytes = self.end_bytes = self.current_bytes = 0
        self.peak_op = ""  # the operator whose output reached the peak
        self.phases: dict[str, int] = {}  # name → the most live bytes while a phase of that name ran (see phase())
        self.largest_bytes = 0  # the largest single storage created inside the block
        self.largest_shape: tuple = ()  # the shape of the tensor that first held it
        self._inside = False
        self._open: list[list] = []
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage → [bytes counted]
        self._refs: list = []

    def _count(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            return
        for st in get_untyped_storages(t):
            entry = self._sizes.get(st)
            size = st.nbytes()
            if entry is None:
                entry = [size]
                self._sizes[st] = entry
                self._refs.append(weakref.ref(st, lambda _ref, e=entry: self._free(e)))
                self.current_bytes += size
                if self._inside and size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape = size, tuple(t.shape)
            elif entry[0] != size:  # resized in place (resize_, out= arguments)
                self.current_bytes += size - entry[0]
                entry[0] = size

    def _free(self, entry: list) -> None:
        self.current_bytes -= entry[0]
        entry[0] = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()  # tensors in reference cycles would otherwise die at a random later point
        for t in _external_tensors(list(self.external)):
            self._count(t)
        self.start_bytes = self.peak_bytes = self.current_bytes
        self._inside = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._inside = False
        gc.collect()
        self.end_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op = self.current_bytes, str(func)
        for ph in self._open:
            ph[1] = max(ph[1], self.current_bytes)
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Within the block, also record the most live bytes under ``phases[name]`` (the largest over repeats)."""
        ph = [name, self.current_bytes]
        self._open.append(ph)
        try:
            yield
        finally:
            self._open.remove(ph)
            self.phases[name] = max(self.phases.get(name, 0), ph[1])

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def real_vocab_tokenizer(vocab_size: int):
    """The character tokenizer of :func:`llm.tiny.build_char_tokenizer` grown to ``vocab_size`` ids: the same
    specials and characters (text still splits into characters), then filler tokens ``<|vN|>`` that text never
    produces but a model may sample (they decode as themselves). For measuring a model with a real vocabulary, e.g.
    Qwen3's 151,936, without a download."""
    base = list(SPECIAL_TOKENS) + list(CHARACTERS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(base):
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer ≥ {len(base)} (the specials and characters)")
    vocab = {tok: i for i, tok in enumerate(base + [f"<|v{i}|>" for i in range(vocab_size - len(base))])}
    char = build_char_tokenizer()
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=char.unk_token, fuse_unk=False))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=char.pad_token, bos_token=char.bos_token,
                                   eos_token=char.eos_token, unk_token=char.unk_token, clean_up_tokenization_spaces=False,
                                   model_max_length=char.model_max_length)


def build_real_vocab_model(out_dir: Union[str, Path], *, vocab_size: int = 151936, hidden_size: int = 64, num_layers: int = 1,
                           num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: Optional[int] = None,
                           tie_word_embeddings: bool = True, seed: int = 0) -> Path:
    """A randomly initialised ``Qwen3ForCausalLM`` with ``vocab_size`` ids and its :func:`real_vocab_tokenizer`,
    saved into ``out_dir`` (returned): Qwen3's architecture with a real vocabulary and tiny everything else."""
    tokenizer = real_vocab_tokenizer(vocab_size)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}, and num_heads by num_kv_heads={num_kv_heads}")
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 3 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         head_dim=hidden_size // num_heads, max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return save_pretrained_dir(Qwen3ForCausalLM(config), tokenizer, out_dir)
