"""Recipes: one YAML file describes an LLM run (model, task, method, training, generation, context).

The ``method:`` block is exactly a :class:`sdpo_sim.core.method.MethodConfig` mapping, so a recipe's
method runs unchanged in the toy world. Everything is validated by :func:`load_recipe` *before* any
model is loaded; errors name the offending field (``training.learning_rate=...``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from sdpo_sim.core.config_fields import YamlLoader, config_class, setting
from sdpo_sim.core.io import atomic_write_text, read_yaml_file
from sdpo_sim.core.method import MethodConfig
from sdpo_sim.core.validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    fail,
)

from .logging import check_report_to

DTYPES = ("float32", "bfloat16", "float16", "auto")
FEEDBACK_KINDS = ("binary", "ordinal", "continuous", "critique", "none")
BACKENDS = ("transformers", "vllm")
VLLM_MODES = ("colocate", "server")
DEFAULT_VLLM_SERVER_URL = "http://127.0.0.1:8000"
# docs/variants.md: the variant settings (MethodConfig.variants_in_use) the LLM trainer does not implement; Recipe.validate
# refuses them by name in one line rather than running them as plain SDPO. None since the reference-policy terms were wired.
LLM_UNWIRED_VARIANTS: tuple[str, ...] = ()
AUTO_CHOICES = ("auto", True, False)
# AdamW moves every weight by about the learning rate per step whatever the gradient's scale; above 1 a single
# step moves each weight by more than the ~0.02 scale a transformer's weights start at, fifty times over
MAX_LEARNING_RATE = 1.0
MAX_TASK_NOISE = 100.0
DEFAULT_REPROMPT = "{prompt}{demo}{feedback}\nCorrectly solve the original task.\n"
DEFAULT_DEMO = "\nA correct solution:\n{demo}\n"
DEFAULT_FEEDBACK = "\nFeedback on your earlier attempt:\n{feedback}\n"


def _owner(section: str) -> str:
    """How messages name a recipe field: ``recipe field training.steps=0 must be ...``."""
    return f"recipe field {section}"


@dataclass
class LoraConfig:
    """Optional LoRA adapters (peft). ``target_modules`` defaults to all attention and MLP projections."""

    r: int = setting(16, "rank of each adapter, ≥ 1")
    alpha: int = setting(32, "LoRA scaling α > 0 (the update is scaled by α / r)")
    dropout: float = setting(0.0, "dropout on the adapters' input, in [0, 1]")
    target_modules: list = setting(help="names of the linear modules that get adapters (a non-empty list)", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        o = _owner("model.lora")
        check_int(o, "r", self.r, 1)
        check_number(o, "alpha", self.alpha, 0.0, lo_open=True)
        check_number(o, "dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.target_modules, list) or not all(isinstance(m, str) for m in self.target_modules) or not self.target_modules:
            fail(o, "target_modules", self.target_modules, "must be a non-empty list of module names")


@dataclass
class ModelConfig:
    """The model to train: where it is, its precision and how it is loaded."""

    path: str = setting("outputs/tiny-model", "a saved transformers model directory, or a hub id downloaded ahead of time (runs never download)")
    dtype: str = setting("float32", "precision: float32; bfloat16 = mixed precision: float32 master weights, gradients and AdamW moments with bfloat16 forwards (16 bytes per trained parameter plus bfloat16 weight copies while a step runs, twice the 8 of all-bfloat16, whose updates round away; LoRA keeps its frozen base in bfloat16); float16 needs FSDP2/DeepSpeed or LoRA (no loss scaling otherwise); auto: the saved config's dtype", choices=DTYPES)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, more compute; turns share_prompt_prefix auto off)")
    lora: Optional[LoraConfig] = setting(None, "LoRA adapters as a mapping {r, alpha, dropout, target_modules}; null: train all weights")
    attn_implementation: Optional[str] = setting(None, "attention kernel passed to transformers, e.g. sdpa or flash_attention_2; null: transformers' default")

    def validate(self) -> None:
        o = _owner("model")
        check_str(o, "path", self.path)
        check_choice(o, "dtype", self.dtype, DTYPES)
        check_bool(o, "gradient_checkpointing", self.gradient_checkpointing)
        check_str(o, "attn_implementation", self.attn_implementation, optional=True)
        if self.lora is not None:
            self.lora.validate()


@dataclass
class TaskConfig:
    """Where prompts come from and how completions are judged and their feedback rendered.

    Prompts: the built-in task ``name``, or a local dataset (``dataset``: JSONL, Parquet, CSV or a ``save_to_disk``
    directory with a ``prompt`` column; every other column is handed to the reward functions). Scores: the task's
    rule-based judge, ``judge``, or ``reward_funcs`` (several, weighted; see :mod:`llm.rewards`)."""

    name: str = setting("word-constraints", "a built-in task of llm.tasks (its prompts unless dataset is set, its judge unless judge or reward_funcs is set)")
    dataset: Optional[str] = setting(None, "a local dataset of prompts: .jsonl/.json, .parquet, .csv or a datasets save_to_disk directory, with a prompt column (text or a list of {role, content} messages); null: the built-in task's prompts")
    dataset_split: Optional[str] = setting(None, "the split of a save_to_disk DatasetDict directory to train on (null: train); only for directories")
    eval_dataset: Optional[str] = setting(None, "the held-out prompts training.eval_steps scores (same formats as dataset); null: eval_split of dataset, or fresh prompts of the built-in task")
    eval_split: Optional[str] = setting(None, "the split of a save_to_disk DatasetDict (eval_dataset, else dataset) to evaluate on, e.g. test")
    context_column: str = setting("privileged_context", "a dataset column of privileged feedback text for the teacher (TRL SDPO's privileged_context); added to every completion's feedback when present")
    reward_funcs: list = setting(help="reward functions, each module:function, path/to/file.py:function, a local reward-model directory or a local causal-LM directory (an LLM judge); called once per batch as fn(prompts, completions, **columns); empty: judge or the task's judge", factory=list)
    reward_weights: Optional[list] = setting(None, "one weight > 0 per reward function; an item's score is the weighted mean of the functions that scored it (null: equal weights)")
    reward_timeout: float = setting(60.0, "seconds > 0 one call of a reward function may take; its items are unscored after that")
    judge_template: Optional[str] = setting(None, "prompt template of an LLM judge in reward_funcs, with {prompt}, {completion} and any column as {name}; null: the built-in template asking for 'score: X/10' and 'critique: ...'")
    feedback: str = setting("critique", "feedback channel rendered for the teacher (the toy world's channels; none: no feedback text, demonstrations only)", choices=FEEDBACK_KINDS)
    noise: float = setting(0.0, "std of the Gaussian noise added to the score before quantisation, in [0, 100] (scores lie in [0, 1])")
    threshold: float = setting(0.5, "pass threshold τ of binary feedback, in [0, 1]")
    judge: Optional[str] = setting(None, "judge spec: module:callable (prompt, completion) -> Judgement, or a local reward-model directory; null: the task's own rule-based judge")

    def validate(self) -> None:
        o = _owner("task")
        check_str(o, "name", self.name)
        for name in ("dataset", "dataset_split", "eval_dataset", "eval_split", "judge", "judge_template"):
            check_str(o, name, getattr(self, name), optional=True)
        check_str(o, "context_column", self.context_column)
        if self.dataset_split is not None and self.dataset is None:
            fail(o, "dataset_split", self.dataset_split, "needs task.dataset (a save_to_disk directory)")
        if self.eval_split is not None and self.dataset is None and self.eval_dataset is None:
            fail(o, "eval_split", self.eval_split, "needs task.eval_dataset or task.dataset (a save_to_disk directory)")
        if not isinstance(self.reward_funcs, list) or not all(isinstance(f, str) and f for f in self.reward_funcs):
            fail(o, "reward_funcs", self.reward_funcs, "must be a list of non-empty strings (module:function, file.py:function or a model directory)")
        if self.reward_funcs and self.judge is not None:
            fail(o, "judge", self.judge, "cannot be set together with task.reward_funcs; put the judge into reward_funcs")
        if self.reward_weights is not None:
            w = self.reward_weights
            if (not isinstance(w, list) or len(w) != len(self.reward_funcs)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in w)):
                fail(o, "reward_weights", w, f"must be a list of {len(self.reward_funcs)} finite numbers > 0, one per reward function")
        check_number(o, "reward_timeout", self.reward_timeout, 0.0, lo_open=True)
        check_choice(o, "feedback", self.feedback, FEEDBACK_KINDS)
        # scores lie in [0, 1]: a noise std of 100 already buries them under noise 100× their range
        check_number(o, "noise", self.noise, 0.0, MAX_TASK_NOISE)
        check_number(o, "threshold", self.threshold, 0.0, 1.0)


@dataclass
class ContextConfig:
    """How each completion's teacher context (reprompt) is built; see :mod:`llm.context`."""

    use_feedback: bool = setting(True, "put the rendered feedback on the completion in the teacher's context")
    use_demo: bool = setting(True, "put the best successful sibling of the group (never the completion itself) in the teacher's context")
    success_threshold: float = setting(0.8, "a sibling scoring at least this (in [0, 1]) is a demonstration")
    feedback_only_without_demo: bool = setting(False, "drop the feedback when a demonstration is present (an official SDPO option)")
    max_context_tokens: int = setting(512, "token budget ≥ 1 of the teacher context (prompt + demonstration + feedback); over it the demonstration loses its end first, then the feedback, then the prompt its beginning; the completion is never cut")
    reprompt_template: str = setting(DEFAULT_REPROMPT, "the teacher context; must contain {prompt}, {demo} and {feedback}")
    demo_template: str = setting(DEFAULT_DEMO, "how a demonstration fills {demo}; must contain {demo}")
    feedback_template: str = setting(DEFAULT_FEEDBACK, "how the feedback fills {feedback}; must contain {feedback}")
    remove_thinking_from_demonstration: bool = setting(False, "remove <think>...</think> blocks from a demonstration before the teacher reads it (TRL SDPO's option)")

    def validate(self) -> None:
        o = _owner("context")
        for name in ("use_feedback", "use_demo", "feedback_only_without_demo", "remove_thinking_from_demonstration"):
            check_bool(o, name, getattr(self, name))
        check_number(o, "success_threshold", self.success_threshold, 0.0, 1.0)
        check_int(o, "max_context_tokens", self.max_context_tokens, 1)
        for name, keys in (("reprompt_template", ("{prompt}", "{demo}", "{feedback}")), ("demo_template", ("{demo}",)),
                           ("feedback_template", ("{feedback}",))):
            value = getattr(self, name)
            check_str(o, name, value)
            missing = [k for k in keys if k not in value]
            if missing:
                fail(o, name, value, f"must contain the placeholder(s) {', '.join(missing)}")


@dataclass
class TrainingConfig:
    """The optimisation loop: steps, batch, AdamW, checkpoints and logs, and how the loss is computed."""

    steps: int = setting(20, "training steps (generated batches), ≥ 1")
    learning_rate: float = setting(1e-5, "AdamW learning rate, in (0, 1] (it does not transfer from the toy world)")
    prompts_per_step: int = setting(4, "prompts per step over all processes (divisible by their number), each with num_generations completions")
    max_new_tokens: int = setting(16, "longest completion in tokens, ≥ 1")
    weight_decay: float = setting(0.01, "AdamW weight decay ≥ 0; learning_rate × weight_decay must be < 1")
    max_grad_norm: float = setting(1.0, "gradient clip: the largest global gradient norm, > 0")
    adam_betas: list = setting(help="AdamW's (β1, β2), a list of two numbers in [0, 1)", factory=lambda: [0.9, 0.999])
    seed: int = setting(0, "seed ≥ 0 of the prompts, the samples and the feedback noise (each completion has its own stream)")
    output_dir: str = setting("outputs/llm-run", "run directory (recipe.yaml, metrics.jsonl, checkpoints, final model); must be a writable directory")
    save_every: int = setting(0, "steps between checkpoints, ≥ 0 (0: only at the end)")
    save_total_limit: Optional[int] = setting(None, "keep only the newest this many checkpoints, ≥ 1 (null: keep all)")
    log_every: int = setting(1, "steps between rows of metrics.jsonl, ≥ 1 (the last step is always logged)")
    heatmap_every: int = setting(0, "steps between per-token credit heat-maps, ≥ 0 (0: never)")
    feedback_credit_every: int = setting(0, "steps between measurements of the feedback credit log p_T(y|context) − log p_T(y|prompt) (one more teacher forward; logged beside the distillation signal and the teacher lag), ≥ 0 (0: never)")
    max_prompt_length: int = setting(256, "student prompt tokens ≥ 1 (longer prompts lose their beginning)")
    max_consecutive_nonfinite: int = setting(3, "this many non-finite losses or gradients in a row (each skips its update) save a checkpoint and stop the run")
    updates_per_batch: int = setting(1, "optimiser steps per generated batch, ≥ 1 (> 1 reuses rollouts: method.is_clip and method.epsilon apply)")
    micro_batch_size: int = setting(0, "completions per forward/backward on each process, gradients accumulated (0: all of them at once)")
    fused_loss: Any = setting("auto", "the chunked SDPO loss from hidden states and the LM head, without [tokens, vocab] logits; auto: when the vocabulary has ≥ fused_min_vocab tokens", choices=AUTO_CHOICES)
    fused_min_vocab: int = setting(32768, "vocabulary size ≥ 1 from which fused_loss=auto fuses")
    chunk_size: Optional[int] = setting(None, "tokens per chunk of the fused loss, ≥ 1; null: about 32 MiB of float32 logits per buffer")
    # run each prompt once per group in the student forward (its KV cache serves the group's G completions):
    # auto = on unless gradient checkpointing or a sharded model (FSDP / DeepSpeed) | true | false
    share_prompt_prefix: Any = setting("auto", "run each shared prompt prefix once and let its KV cache serve the rows that begin with it (same loss and gradients); auto: on unless gradient checkpointing or a sharded model (true refuses those)", choices=AUTO_CHOICES)
    mask_truncated_completions: bool = setting(False, "completions cut off at max_new_tokens (no end-of-sequence token) get no loss and are not demonstrations (TRL's option)")
    eval_steps: int = setting(0, "steps between evaluations on the held-out prompts (task.eval_dataset / eval_split, else fresh built-in prompts), ≥ 0 (0: only a final one when eval prompts are given)")
    eval_prompts: int = setting(32, "held-out prompts per evaluation, ≥ 1 (the first ones of the eval split)")
    eval_num_generations: int = setting(4, "k: sampled completions per eval prompt for mean@k and pass@k, ≥ 1 (plus one greedy completion)")
    eval_pass_threshold: float = setting(0.8, "a completion scoring at least this (in [0, 1]) passes, for pass@k")
    report_to: list = setting(help="trackers: jsonl (metrics.jsonl, always written), tensorboard (output_dir/tensorboard), wandb (offline unless WANDB_MODE says otherwise; output_dir/wandb); pip install 'sdpo-lab[tracking]'", factory=lambda: ["jsonl"])

    def validate(self) -> None:
        o = _owner("training")
        check_int(o, "steps", self.steps, 1)
        check_number(o, "learning_rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, lo_open=True)
        check_int(o, "prompts_per_step", self.prompts_per_step, 1)
        check_int(o, "max_new_tokens", self.max_new_tokens, 1)
        check_number(o, "weight_decay", self.weight_decay, 0.0)
        if self.learning_rate * self.weight_decay >= 1:  # AdamW scales each weight by (1 − lr·wd) per step
            fail(o, "weight_decay", self.weight_decay, f"times training.learning_rate={self.learning_rate!r} must be < 1 "
                 "(AdamW multiplies every weight by 1 − lr·weight_decay each step)")
        check_number(o, "max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        if not (isinstance(self.adam_betas, list) and len(self.adam_betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.adam_betas)):
            fail(o, "adam_betas", self.adam_betas, "must be a list of two numbers in [0, 1)")
        check_int(o, "seed", self.seed, 0)
        check_str(o, "output_dir", self.output_dir)
        for name in ("save_every", "heatmap_every", "feedback_credit_every", "micro_batch_size"):
            check_int(o, name, getattr(self, name), 0)
        for name in ("log_every", "max_prompt_length", "max_consecutive_nonfinite", "updates_per_batch", "fused_min_vocab"):
            check_int(o, name, getattr(self, name), 1)
        check_choice(o, "fused_loss", self.fused_loss, AUTO_CHOICES)
        check_choice(o, "share_prompt_prefix", self.share_prompt_prefix, AUTO_CHOICES)
        check_int(o, "chunk_size", self.chunk_size, 1, optional=True)
        check_int(o, "save_total_limit", self.save_total_limit, 1, optional=True)
        check_bool(o, "mask_truncated_completions", self.mask_truncated_completions)
        check_int(o, "eval_steps", self.eval_steps, 0)
        for name in ("eval_prompts", "eval_num_generations"):
            check_int(o, name, getattr(self, name), 1)
        check_number(o, "eval_pass_threshold", self.eval_pass_threshold, 0.0, 1.0)
        check_report_to(self.report_to, f"{o}.report_to")


@dataclass
class GenerationConfig:
    """Sampling settings; the temperature is the method's (``method.temperature``)."""

    backend: str = setting("transformers", "sampler: transformers' generate, or vLLM (needs vLLM installed; the trainer's weights, LoRA merged, are pushed into it before every call)", choices=BACKENDS)
    top_p: float = setting(1.0, "nucleus sampling mass, in (0, 1] (1: off)")
    top_k: int = setting(0, "keep only the k most probable tokens, ≥ 0 (0: off)")
    vllm_gpu_memory_utilization: float = setting(0.3, "share of GPU memory, in (0, 1], a colocated vLLM engine may take (vllm_mode=colocate only; a server sets its own)")
    vllm_mode: str = setting("colocate", "backend=vllm: colocate (an engine inside each training process, on its GPU) or server (one `python -m llm.vllm_server` process on GPUs of its own, over HTTP)", choices=VLLM_MODES)
    vllm_server_url: Optional[str] = setting(None, f"vllm_mode=server: the server's http(s):// URL; null: {DEFAULT_VLLM_SERVER_URL}")
    vllm_server_timeout: float = setting(240.0, "vllm_mode=server: seconds > 0 to wait for the server to answer at start")
    logprob_gap_every: int = setting(0, "backend=vllm: steps between measurements of the engine's vs the trainer's log-probabilities of the sampled tokens (one more forward; logged as logprob_gap_mean_abs, _max_abs, _mean), ≥ 0 (0: never)")
    chat_template_kwargs: dict = setting(help="extra keyword arguments of the tokenizer's chat template, e.g. {enable_thinking: false} for Qwen3", factory=dict)

    def validate(self) -> None:
        o = _owner("generation")
        check_choice(o, "backend", self.backend, BACKENDS)
        check_number(o, "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_int(o, "top_k", self.top_k, 0)
        check_number(o, "vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        check_choice(o, "vllm_mode", self.vllm_mode, VLLM_MODES)
        check_str(o, "vllm_server_url", self.vllm_server_url, optional=True)
        if self.vllm_server_url is not None and not self.vllm_server_url.startswith(("http://", "https://")):
            fail(o, "vllm_server_url", self.vllm_server_url, "must start with http:// or https://")
        check_number(o, "vllm_server_timeout", self.vllm_server_timeout, 0.0, lo_open=True)
        check_int(o, "logprob_gap_every", self.logprob_gap_every, 0)
        if self.logprob_gap_every and self.backend != "vllm":
            fail(o, "logprob_gap_every", self.logprob_gap_every, "is only read with generation.backend: vllm (the transformers backend samples from the trainer's own weights)")
        if self.vllm_mode == "server" and self.backend != "vllm":
            fail(o, "vllm_mode", self.vllm_mode, f"needs generation.backend: vllm (backend is {self.backend!r})")
        if self.vllm_server_url is not None and (self.backend != "vllm" or self.vllm_mode != "server"):
            fail(o, "vllm_server_url", self.vllm_server_url, "is only read with generation.backend: vllm and vllm_mode: server")
        if not isinstance(self.chat_template_kwargs, dict) or not all(isinstance(k, str) for k in self.chat_template_kwargs):
            fail(o, "chat_template_kwargs", self.chat_template_kwargs, "must be a mapping of keyword names to values")


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "context": ContextConfig, "training": TrainingConfig, "generation": GenerationConfig}


# fields a recipe may still carry from an earlier version, and what replaced them
RENAMED = {"training.tensorboard": "training.report_to: [jsonl, tensorboard]"}


def _refuse_unknown_fields(source: str, prefix: str, block: Mapping, spec_cls: type) -> None:
    """Raise ``ValueError`` naming every key of ``block`` that is not a field of ``spec_cls``."""
    allowed = {f.name for f in fields(spec_cls)}
    bad = sorted(set(block) - allowed)
    for b in bad:
        if f"{prefix}.{b}" in RENAMED:
            raise ValueError(f"{source}: recipe field {prefix}.{b} was replaced; use {RENAMED[f'{prefix}.{b}']}")
    if bad:
        raise ValueError(f"{source}: unknown field(s) {', '.join(f'{prefix}.{b}' for b in bad)}; known: {', '.join(sorted(allowed))}")


@dataclass
class Recipe:
    """A validated LLM run description. Build with :func:`load_recipe` or :meth:`from_dict`."""

    model: ModelConfig = setting(help="the model to train (ModelConfig)", factory=ModelConfig)
    task: TaskConfig = setting(help="prompts, judge and feedback channel (TaskConfig)", factory=TaskConfig)
    method: MethodConfig = setting(help="the method, exactly a toy-world MethodConfig mapping", factory=MethodConfig)
    context: ContextConfig = setting(help="how teacher contexts are built (ContextConfig)", factory=ContextConfig)
    training: TrainingConfig = setting(help="the optimisation loop (TrainingConfig)", factory=TrainingConfig)
    generation: GenerationConfig = setting(help="sampling settings (GenerationConfig)", factory=GenerationConfig)

    def validate(self) -> "Recipe":
        for name in SECTIONS:
            getattr(self, name).validate()
        self.method.validate()
        refused = [v for v in self.method.variants_in_use() if v in LLM_UNWIRED_VARIANTS]
        if refused:
            name = refused[0]
            raise ValueError(f"recipe field method.{name}={getattr(self.method, name)!r} is not yet in the LLM trainer (the toy "
                             f"world runs it, docs/variants.md); leave it at its default {MethodConfig().to_dict()[name]!r}")
        if self.task.dataset is not None and not self.task.reward_funcs and self.task.judge is None:
            raise ValueError(f"recipe field task.dataset={self.task.dataset!r} needs task.reward_funcs (or task.judge): the built-in "
                             f"task's judge only understands its own prompts")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> "Recipe":
        """Build from a plain mapping; unknown sections and fields are refused by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a recipe must be a mapping with sections {', '.join(['model', 'task', 'method', *list(SECTIONS)[2:]])}")
        known = set(SECTIONS) | {"method"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown recipe section(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        parts: dict[str, Any] = {}
        for name, spec_cls in SECTIONS.items():
            block = data.get(name) or {}
            if not isinstance(block, Mapping):
                raise ValueError(f"{source}: recipe section {name!r} must be a mapping, got {type(block).__name__}")
            _refuse_unknown_fields(source, name, block, spec_cls)
            values = dict(block)
            if name == "model" and values.get("lora") is not None:
                lora = values["lora"]
                if not isinstance(lora, Mapping):
                    raise ValueError(f"{source}: recipe field model.lora must be a mapping or null")
                _refuse_unknown_fields(source, "model.lora", lora, LoraConfig)
                values["lora"] = LoraConfig(**lora)
            parts[name] = spec_cls(**values)
        try:
            parts["method"] = MethodConfig.from_dict(data.get("method") or {})
        except ValueError as err:
            raise ValueError(f"{source}: recipe section method: {err}") from None
        recipe = cls(**parts)
        try:
            return recipe.validate()
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "task", "method", "context", "training", "generation")}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(path, self.to_yaml())

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Recipe":
        """A validated copy with dotted overrides applied, e.g. ``{"training.steps": 3, "model.lora.r": 8}``.

        A key may reach into a sub-block (``model.lora.r``); a sub-block that is null (no LoRA) becomes one with the
        defaults and that field. Whole blocks are applied before the fields inside them."""
        data = self.to_dict()
        for key, value in sorted(overrides.items(), key=lambda kv: kv[0].count(".")):
            section, _, name = key.partition(".")
            if section not in data or not name:
                raise ValueError(f"override {key!r} must be 'section.field' with section one of {', '.join(data)}")
            *parents, name = name.split(".")
            block, cls, where = data[section], config_class(type(self), section), section
            for part in parents:
                inner = config_class(cls, part) if part in {f.name for f in fields(cls)} else None
                if inner is None:
                    raise ValueError(f"override {key!r}: {where}.{part} is not a block of fields")
                if block[part] is None:
                    block[part] = {}
                block, cls, where = block[part], inner, f"{where}.{part}"
            block[name] = value
        return type(self).from_dict(data, source="recipe with overrides")


def load_recipe(path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """Read and validate a recipe YAML file (safe loader) without touching any model."""
    path = Path(path)
    shipped = ", ".join(p.stem for p in shipped_recipes())
    data = read_yaml_file(path, "recipe file", f"give a recipe YAML file or a shipped name ({shipped})", loader=YamlLoader)
    recipe = Recipe.from_dict(data or {}, source=str(path))
    return recipe.with_overrides(overrides) if overrides else recipe


def shipped_recipes() -> list[Path]:
    """The recipes shipped with the package (``llm/recipes/*.yaml``)."""
    return sorted((Path(__file__).parent / "recipes").glob("*.yaml"))


def resolve_recipe_path(name: Union[str, Path]) -> Path:
    """A path as given, or the name of a shipped recipe (``tiny-cpu`` → ``llm/recipes/tiny-cpu.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).parent / "recipes" / f"{path.stem}.yaml"
    return shipped if shipped.is_file() and path.suffix in ("", ".yaml") and len(path.parts) == 1 else path


def check_model_path(recipe: Recipe) -> None:
    """Refuse a local-looking model path that does not exist, saying how to create one."""
    path = Path(recipe.model.path)
    looks_local = path.is_absolute() or recipe.model.path.startswith((".", "~")) or len(path.parts) != 2 or path.parts[0] in ("outputs",)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={recipe.model.path!r} exists but has no config.json; it must be a saved transformers model directory")
        return
    if looks_local:
        raise ValueError(
            f"model.path={recipe.model.path!r} does not exist. Create the tiny model with "
            f"`sdpo-llm make-tiny --out {recipe.model.path}`, or point model.path at a saved transformers model "
            "directory (or a hub id such as Qwen/Qwen3-8B, downloaded ahead of time)."
        )
