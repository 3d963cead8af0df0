"""Run configuration: nested dataclasses, loaded from a JSON or TOML file and overridden by CLI flags.

    config = load_config("run.toml", overrides={"train.iterations": 100, "pool.k": 4})

Every field has the paper's default (arXiv 2601.22828, its released script) unless said otherwise; unknown keys,
wrong types and out-of-range values raise a ValueError that names the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

METHODS = ("pool", "lora", "full")
BENCHMARKS = ("synthetic", "mtil", "xtail")
MTIL_ORDERS = ("I", "II")
ROUTING_MODES = ("sample", "batch")
GATE_KINDS = ("none", "softmax", "sigmoid")
PRECISIONS = ("fp32", "fp64", "bf16", "fp16")


@dataclass
class ModelConfig:
    """name: any open_clip architecture (`open_clip.list_models()`) or the package's tiny "rank1-tiny-vit";
    pretrained: an open_clip tag, a local checkpoint path, or None for random weights (seeded). Not the paper's
    default: it starts from "openai", which open_clip downloads, so it is asked for by name."""

    name: str = "ViT-B-16"
    pretrained: Optional[str] = None
    device: str = "cpu"
    precision: str = "fp32"


@dataclass
class PoolSettings:
    """The pool layers injected into both towers (rank1_kernels.PoolConfig) and the per-task merge."""

    r: int = 12
    k: int = 8
    alpha: float = 1.0
    dropout: float = 0.2
    routing: str = "batch"  # the paper's code: the k experts most voted in the batch serve the whole batch
    gate: str = "none"
    backend: str = "auto"
    targets: list = field(default_factory=lambda: ["*.attn", "*.mlp.c_fc", "*.mlp.c_proj"])
    attention_projections: list = field(default_factory=lambda: ["q", "k", "v", "out"])
    merge_top_m: int = 4
    # Text-tower routing token: "eot" each caption's end-of-text token (rank1_kernels' default), "first" token 0
    # as in the paper's code (the start token: identical for every caption under the causal mask).
    text_routing: str = "eot"


@dataclass
class TrainConfig:
    """method: "pool" (rank-1 expert pool + AGO, the paper), "lora" (dense LoRA of rank r, all experts merged
    after each task), "full" (sequential fine-tuning of every weight). shots: images per class (None: full-shot).
    compile: torch.compile the training forward (the pool layers trace without graph breaks; the first step of a
    run compiles). An eager step is bound by the host's per-layer work on a fast GPU; this takes it out."""

    method: str = "pool"
    iterations: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    ago_weight: float = 0.1
    shots: Optional[int] = 5
    seed: int = 42
    log_every: int = 50
    compile: bool = False


@dataclass
class DataConfig:
    """benchmark: "mtil" (11 datasets under data_root, torchvision layouts), "xtail" (the same order without
    CIFAR100: X-TAIL's 10 domains) or "synthetic" (generated, no download). tasks: an explicit list of task names
    in training order (default: the MTIL order, that order without CIFAR100, or all synthetic domains)."""

    benchmark: str = "mtil"
    order: str = "I"
    data_root: Optional[str] = None
    tasks: Optional[list] = None
    num_workers: int = 0
    train_augment: bool = False  # open_clip's training augmentation; False: the evaluation transform (CLIP's one)
    synthetic_train_per_class: int = 40
    synthetic_test_per_class: int = 40


@dataclass
class EvalConfig:
    """x_tail: also classify every image over the union of all tasks' class names (no task id), each class's text
    embedding from the one prompt xtail_template (X-TAIL's evaluation, RAIL's template by default: per-domain
    template ensembles would name the domain, "..., a type of aircraft.", which makes telling domains apart easier).
    max_test_per_task: a deterministic subset of each test set (None: all of it)."""

    x_tail: bool = True
    xtail_template: str = "a photo of a {}."
    batch_size: int = 256
    max_test_per_task: Optional[int] = None


@dataclass
class RunConfig:
    run_dir: str = "runs/train"
    resume: bool = False
    checkpoints: bool = True
    stop_after_task: Optional[int] = None  # train only the first N tasks of the sequence, then stop


@dataclass
class CLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pool: PoolSettings = field(default_factory=PoolSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> CLConfig:
        """Raise a ValueError naming the first bad setting; returns self."""
        _choice("train.method", self.train.method, METHODS)
        _choice("data.benchmark", self.data.benchmark, BENCHMARKS)
        _choice("data.order", self.data.order, MTIL_ORDERS)
        _choice("pool.routing", self.pool.routing, ROUTING_MODES)
        _choice("pool.gate", self.pool.gate, GATE_KINDS)
        _choice("pool.text_routing", self.pool.text_routing, ("eot", "first"))
        _choice("model.precision", self.model.precision, PRECISIONS)
        if self.model.precision == "fp16":
            raise ValueError(
                "model.precision='fp16' would train the adapters in fp16, where AdamW's eps (1e-8) rounds to 0 and "
                "the first step turns every zero gradient into NaN; use 'bf16' or 'fp32'"
            )
        for section in (self.model, self.pool, self.train, self.data, self.eval, self.run):
            for name, value in dataclasses.asdict(section).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{_section_name(section)}.{name}={value}: expected a finite number")
        import torch  # here, not at the top: reading a config file needs no torch

        try:
            device = torch.device(self.model.device)
        except RuntimeError as exc:
            raise ValueError(f"model.device={self.model.device!r} is not a device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device={self.model.device!r}, but torch sees no CUDA device; use 'cpu'")
        _at_least("pool.r", self.pool.r, 1)
        if not 1 <= self.pool.k <= self.pool.r:
            raise ValueError(f"pool.k={self.pool.k} must be in [1, pool.r={self.pool.r}] (experts chosen per sample)")
        if not 1 <= self.pool.merge_top_m <= self.pool.r:
            raise ValueError(f"pool.merge_top_m={self.pool.merge_top_m} must be in [1, pool.r={self.pool.r}]")
        if not self.pool.alpha > 0:
            raise ValueError(f"pool.alpha={self.pool.alpha} must be > 0: the pool's update is scaled by alpha / r")
        if not 0.0 <= self.pool.dropout < 1.0:
            raise ValueError(f"pool.dropout={self.pool.dropout} must be in [0, 1)")
        if not self.pool.targets:
            raise ValueError("pool.targets is empty; expected glob patterns over module names such as '*.attn'")
        _at_least("train.iterations", self.train.iterations, 1)
        _at_least("train.batch_size", self.train.batch_size, 2)
        if self.train.lr <= 0 or self.train.min_lr < 0 or self.train.min_lr > self.train.lr:
            raise ValueError(
                f"train.lr={self.train.lr}, train.min_lr={self.train.min_lr}: expected 0 <= min_lr <= lr, lr > 0"
            )
        _at_least("train.weight_decay", self.train.weight_decay, 0)
        _at_least("train.ago_weight", self.train.ago_weight, 0)
        if not 0 <= self.train.seed < 2**32:  # numpy's seeds
            raise ValueError(f"train.seed={self.train.seed} must be in [0, 2**32)")
        if self.train.shots is not None:
            _at_least("train.shots", self.train.shots, 1)
        _at_least("train.log_every", self.train.log_every, 1)
        _at_least("data.num_workers", self.data.num_workers, 0)
        _at_least("data.synthetic_train_per_class", self.data.synthetic_train_per_class, 1)
        _at_least("data.synthetic_test_per_class", self.data.synthetic_test_per_class, 1)
        _at_least("eval.batch_size", self.eval.batch_size, 1)
        if self.eval.max_test_per_task is not None:
            _at_least("eval.max_test_per_task", self.eval.max_test_per_task, 1)
        if self.eval.xtail_template.count("{}") != 1:
            raise ValueError(
                f"eval.xtail_template={self.eval.xtail_template!r} must hold one '{{}}' for the class name, "
                f"e.g. 'a photo of a {{}}.'"
            )
        if self.run.stop_after_task is not None:
            _at_least("run.stop_after_task", self.run.stop_after_task, 1)
        if self.data.benchmark in ("mtil", "xtail") and not self.data.data_root:
            raise ValueError(
                f"data.benchmark={self.data.benchmark!r} needs data.data_root (--data-root DIR): the folder holding "
                f"the MTIL datasets in torchvision layouts; or use --benchmark synthetic, which needs no download"
            )
        if self.data.tasks is not None:
            repeated = sorted({name for name in self.data.tasks if self.data.tasks.count(name) > 1})
            if repeated:
                raise ValueError(f"data.tasks names {repeated} more than once; expected each task once")
            if self.data.benchmark == "xtail" and "CIFAR100" in self.data.tasks:
                raise ValueError(
                    "data.tasks has CIFAR100, which X-TAIL's 10 domains leave out; use --benchmark mtil to train "
                    "on it"
                )
        unknown_projections = set(self.pool.attention_projections) - {"q", "k", "v", "out"}
        if unknown_projections:
            raise ValueError(
                f"pool.attention_projections has {sorted(unknown_projections)}; expected a subset of q, k, v, out"
            )
        return self


def _section_name(section) -> str:
    return {ModelConfig: "model", PoolSettings: "pool", TrainConfig: "train", DataConfig: "data", EvalConfig: "eval",
            RunConfig: "run"}[type(section)]  # fmt: skip


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported; expected one of {list(choices)}")


def _at_least(key: str, value, minimum) -> None:
    if value < minimum:
        raise ValueError(f"{key}={value!r} must be >= {minimum}")


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check (and, for strings from the command line, convert) a value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        try:
            return _coerce(key, value, inner)
        except ValueError:
            raise ValueError(f"{key}={value!r} has the wrong type; expected {inner.__name__} or none") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
    else:
        return value
    raise ValueError(f"{key}={value!r} has the wrong type; expected {getattr(annotation, '__name__', annotation)}")


def _section_fields(section) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _unknown(key: str, known) -> ValueError:
    close = difflib.get_close_matches(key.rpartition(".")[2], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown setting {key!r}{hint}; expected one of {sorted(known)}")


def apply_overrides(config: CLConfig, values: dict) -> CLConfig:
    """Set nested values {"train": {"lr": 1e-3}} or dotted ones {"train.lr": 1e-3} on config (in place)."""
    sections = {f.name for f in dataclasses.fields(config)}
    for key, value in values.items():
        if "." in key:
            section_name, _, field_name = key.partition(".")
            items = {field_name: value}
        else:
            section_name, items = key, value
            if not isinstance(items, dict):
                raise ValueError(
                    f"setting {key!r} must be a section (a table of settings); expected one of {sorted(sections)}"
                )
        if section_name not in sections:
            raise _unknown(section_name, sections)
        section = getattr(config, section_name)
        fields = _section_fields(section)
        for field_name, field_value in items.items():
            full_key = f"{section_name}.{field_name}"
            if field_name not in fields:
                raise _unknown(full_key, fields)
            setattr(section, field_name, _coerce(full_key, field_value, fields[field_name]))
    return config


def parse_assignments(assignments) -> dict:
    """["train.lr=1e-3", ...] -> {"train.lr": "1e-3", ...} (types are checked by apply_overrides)."""
    parsed = {}
    for assignment in assignments or ():
        key, equals, value = assignment.partition("=")
        if not equals or "." not in key:
            raise ValueError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. train.iterations=100")
        parsed[key.strip()] = value.strip()
    return parsed


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON (.json) or TOML (.toml) file as a nested dict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"config file {path!r} is a directory; expected a .json or .toml file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if path.endswith(".toml"):
        try:
            import tomllib  # Python 3.11+
        except ModuleNotFoundError:
            try:
                import tomli as tomllib  # the same parser, packaged for Python 3.10
            except ModuleNotFoundError:
                raise ValueError(
                    f"config file {path!r}: reading TOML needs Python 3.11+ or `pip install tomli`; or write it as .json"
                ) from None

        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {path!r} is not valid TOML: {error}") from None
    elif path.endswith(".json"):
        try:
            with open(path) as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path!r} is not valid JSON: {error}") from None
    else:
        raise ValueError(f"config file {path!r}: expected a .json or .toml file")
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {path!r} holds a {type(values).__name__}; expected an object of sections "
            f"(model, pool, train, data, eval, run)"
        )
    return values


def load_config(
    path: str | os.PathLike | None = None, overrides: dict | None = None, base: CLConfig | None = None
) -> CLConfig:
    """Defaults (or `base`), then the file at `path`, then `overrides` (dotted keys), validated."""
    config = base if base is not None else CLConfig()
    if path is not None:
        apply_overrides(config, read_config_file(path))
    if overrides:
        apply_overrides(config, overrides)
    return config.validate()


def config_from_dict(values: dict) -> CLConfig:
    return apply_overrides(CLConfig(), values).validate()
