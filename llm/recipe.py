"""Recipes: one YAML file describes an LLM run (model, task, method, training, generation, context).

The ``method:`` block is exactly a :class:`sdpo_sim.core.method.MethodConfig` mapping, so a recipe's
method runs unchanged in the toy world. Everything is validated by :func:`load_recipe` *before* any
model is loaded; errors name the offending field (``training.learning_rate=...``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from sdpo_sim.core.io import atomic_write_text, read_yaml_file
from sdpo_sim.core.method import MethodConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
FEEDBACK_KINDS = ("binary", "ordinal", "continuous", "critique", "none")
BACKENDS = ("transformers", "vllm")
AUTO_CHOICES = ("auto", True, False)
# AdamW moves every weight by about the learning rate per step whatever the gradient's scale; above 1 a single
# step moves each weight by more than the ~0.02 scale a transformer's weights start at, fifty times over
MAX_LEARNING_RATE = 1.0
MAX_TASK_NOISE = 100.0
DEFAULT_REPROMPT = "{prompt}{demo}{feedback}\nCorrectly solve the original task.\n"
DEFAULT_DEMO = "\nA correct solution:\n{demo}\n"
DEFAULT_FEEDBACK = "\nFeedback on your earlier attempt:\n{feedback}\n"


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-5`` as a float: YAML 1.1 (PyYAML) wants a dot (``1.0e-5``)
    and would hand the trainer the string ``'1e-5'``."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`RecipeLoader` (safe: no Python tags)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 — a SafeLoader subclass


def _fail(section: str, name: str, value: Any, must: str) -> None:
    raise ValueError(f"recipe field {section}.{name}={value!r} {must}")


def _int(section: str, name: str, value: Any, lo: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        _fail(section, name, value, f"must be an integer ≥ {lo}")


def _num(section: str, name: str, value: Any, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        _fail(section, name, value, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}]")


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(section, name, value, f"is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(section, name, value, "must be true or false")


def _str(section: str, name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        _fail(section, name, value, "must be a non-empty string")


@dataclass
class LoraConfig:
    """Optional LoRA adapters (peft). ``target_modules`` defaults to all attention and MLP projections."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        _int("model.lora", "r", self.r, 1)
        _num("model.lora", "alpha", self.alpha, 0.0, lo_open=True)
        _num("model.lora", "dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.target_modules, list) or not all(isinstance(m, str) for m in self.target_modules) or not self.target_modules:
            _fail("model.lora", "target_modules", self.target_modules, "must be a non-empty list of module names")


@dataclass
class ModelConfig:
    path: str = "outputs/tiny-model"  # local directory or hub id (hub ids need network at run time)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora: Optional[LoraConfig] = None
    attn_implementation: Optional[str] = None  # e.g. sdpa | flash_attention_2 (None: transformers' default)

    def validate(self) -> None:
        _str("model", "path", self.path)
        _choice("model", "dtype", self.dtype, DTYPES)
        _bool("model", "gradient_checkpointing", self.gradient_checkpointing)
        _str("model", "attn_implementation", self.attn_implementation, optional=True)
        if self.lora is not None:
            self.lora.validate()


@dataclass
class TaskConfig:
    name: str = "word-constraints"
    feedback: str = "critique"  # binary | ordinal | continuous | critique | none (the toy world's channels)
    noise: float = 0.0  # std of the noise added to the score before quantisation
    threshold: float = 0.5  # binary feedback threshold
    judge: Optional[str] = None  # load_judge spec; None: the task's own rule-based judge

    def validate(self) -> None:
        _str("task", "name", self.name)
        _choice("task", "feedback", self.feedback, FEEDBACK_KINDS)
        # scores lie in [0, 1]: a noise std of 100 already buries them under noise 100× their range
        _num("task", "noise", self.noise, 0.0, MAX_TASK_NOISE)
        _num("task", "threshold", self.threshold, 0.0, 1.0)
        _str("task", "judge", self.judge, optional=True)


@dataclass
class ContextConfig:
    """How each completion's teacher context (reprompt) is built; see :mod:`llm.context`."""

    use_feedback: bool = True  # put the rendered feedback in the teacher's context
    use_demo: bool = True  # put the best successful sibling (never itself) in the teacher's context
    success_threshold: float = 0.8  # a sibling is a demonstration if its score ≥ this
    feedback_only_without_demo: bool = False  # official SDPO option: drop feedback when a demo exists
    max_context_tokens: int = 512  # teacher context budget (prompt + demo + feedback), the completion is never cut
    reprompt_template: str = DEFAULT_REPROMPT
    demo_template: str = DEFAULT_DEMO
    feedback_template: str = DEFAULT_FEEDBACK

    def validate(self) -> None:
        for name in ("use_feedback", "use_demo", "feedback_only_without_demo"):
            _bool("context", name, getattr(self, name))
        _num("context", "success_threshold", self.success_threshold, 0.0, 1.0)
        _int("context", "max_context_tokens", self.max_context_tokens, 1)
        for name, keys in (("reprompt_template", ("{prompt}", "{demo}", "{feedback}")), ("demo_template", ("{demo}",)),
                           ("feedback_template", ("{feedback}",))):
            value = getattr(self, name)
            _str("context", name, value)
            missing = [k for k in keys if k not in value]
            if missing:
                _fail("context", name, value, f"must contain the placeholder(s) {', '.join(missing)}")


@dataclass
class TrainingConfig:
    steps: int = 20
    learning_rate: float = 1e-5
    prompts_per_step: int = 4  # global (all processes) prompts per step; × num_generations completions
    max_new_tokens: int = 16
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    output_dir: str = "outputs/llm-run"
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 1
    heatmap_every: int = 0  # steps between credit heat-maps (0: never)
    max_prompt_length: int = 256  # student prompt tokens (left-truncated)
    max_consecutive_nonfinite: int = 3  # this many non-finite losses in a row stop the run (with a checkpoint)
    updates_per_batch: int = 1  # optimiser steps per generated batch (>1 reuses rollouts: IS clip / PPO clip apply)
    micro_batch_size: int = 0  # completions per forward/backward on each process (0: all of them at once)
    fused_loss: Any = "auto"  # auto (fused when vocab ≥ fused_min_vocab) | true | false
    fused_min_vocab: int = 32768
    chunk_size: Optional[int] = None  # fused loss tokens per chunk (None: about 32 MiB of fp32 logits per buffer)
    # run each prompt once per group in the student forward (its KV cache serves the group's G completions):
    # auto = on unless gradient checkpointing or a sharded model (FSDP / DeepSpeed) | true | false
    share_prompt_prefix: Any = "auto"
    tensorboard: bool = False

    def validate(self) -> None:
        s = "training"
        _int(s, "steps", self.steps, 1)
        _num(s, "learning_rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, lo_open=True)
        _int(s, "prompts_per_step", self.prompts_per_step, 1)
        _int(s, "max_new_tokens", self.max_new_tokens, 1)
        _num(s, "weight_decay", self.weight_decay, 0.0)
        if self.learning_rate * self.weight_decay >= 1:  # AdamW scales each weight by (1 − lr·wd) per step
            _fail(s, "weight_decay", self.weight_decay, f"times training.learning_rate={self.learning_rate!r} must be < 1 "
                  "(AdamW multiplies every weight by 1 − lr·weight_decay each step)")
        _num(s, "max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        if not (isinstance(self.adam_betas, list) and len(self.adam_betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.adam_betas)):
            _fail(s, "adam_betas", self.adam_betas, "must be a list of two numbers in [0, 1)")
        _int(s, "seed", self.seed, 0)
        _str(s, "output_dir", self.output_dir)
        for name in ("save_every", "heatmap_every", "micro_batch_size"):
            _int(s, name, getattr(self, name), 0)
        for name in ("log_every", "max_prompt_length", "max_consecutive_nonfinite", "updates_per_batch", "fused_min_vocab"):
            _int(s, name, getattr(self, name), 1)
        _choice(s, "fused_loss", self.fused_loss, AUTO_CHOICES)
        _choice(s, "share_prompt_prefix", self.share_prompt_prefix, AUTO_CHOICES)
        if self.chunk_size is not None:
            _int(s, "chunk_size", self.chunk_size, 1)
        _bool(s, "tensorboard", self.tensorboard)


@dataclass
class GenerationConfig:
    """Sampling settings; the temperature is the method's (``method.temperature``)."""

    backend: str = "transformers"
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    vllm_gpu_memory_utilization: float = 0.3

    def validate(self) -> None:
        _choice("generation", "backend", self.backend, BACKENDS)
        _num("generation", "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int("generation", "top_k", self.top_k, 0)
        _num("generation", "vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0.0, 1.0, lo_open=True)


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "context": ContextConfig, "training": TrainingConfig, "generation": GenerationConfig}


def _refuse_unknown_fields(source: str, prefix: str, block: Mapping, spec_cls: type) -> None:
    """Raise ``ValueError`` naming every key of ``block`` that is not a field of ``spec_cls``."""
    allowed = {f.name for f in fields(spec_cls)}
    bad = sorted(set(block) - allowed)
    if bad:
        raise ValueError(f"{source}: unknown field(s) {', '.join(f'{prefix}.{b}' for b in bad)}; known: {', '.join(sorted(allowed))}")

@dataclass
class Recipe:
    """A validated LLM run description. Build with :func:`load_recipe` or :meth:`from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> "Recipe":
        for name in SECTIONS:
            getattr(self, name).validate()
        self.method.validate()
        if self.generation.backend == "vllm" and self.model.lora is not None:
            raise ValueError("recipe field generation.backend='vllm' is not supported with model.lora yet "
                             "(the engine would need merged adapter weights each step); use backend: transformers")
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
        """A validated copy with dotted overrides applied, e.g. ``{"training.steps": 3}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in data or not name:
                raise ValueError(f"override {key!r} must be 'section.field' with section one of {', '.join(data)}")
            data[section][name] = value
        return type(self).from_dict(data, source="recipe with overrides")


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.steps=5"`` → ``("training.steps", 5)``; the value is parsed as YAML (safe)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r} must look like section.field=value")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0]
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({reason}); quote strings, e.g. key='a: b'") from None


def load_recipe(path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> Recipe:
    """Read and validate a recipe YAML file (safe loader) without touching any model."""
    path = Path(path)
    shipped = ", ".join(p.stem for p in shipped_recipes())
    data = read_yaml_file(path, "recipe file", f"give a recipe YAML file or a shipped name ({shipped})", loader=RecipeLoader)
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
