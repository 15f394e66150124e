"""The run configuration of `remoe train`: a preset or YAML file plus command-line flags, checked before any work.

A run has three sections, each with a closed set of keys:

- `model`: `ReMoEConfig` fields (the vocabulary and special tokens come from the tokenizer);
- `data`: `DATA_FIELDS`;
- `training`: `TrainingArguments` fields, plus `deepspeed` and `expert_parallel_size`.

`plan_run` turns the options of `remoe train` into a `RunConfig`: it merges the file and the flags (`resolve_run`) and
checks the YAML itself (duplicate keys, empty sections), every key ("did you mean ..." for unknown ones), every type
and range (naming the field; numbers YAML 1.1 reads as text, like `1e-3`, become floats), the combinations (in one
process also through a throwaway `TrainingArguments`), the parallel layout (`remoe.training.distributed`), the machine
(memory for the model, bf16) and the output folder. A non-empty output folder is never reused silently: it is refused
unless the run resumes it (same model and data as its `run_config.yaml`) or `--overwrite` asks to replace it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import types
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
from transformers.trainer_utils import SchedulerType

from remoe import ReMoEConfig
from remoe.checkpoints import check_checkpoint
from remoe.configuration import load_preset

from .distributed import accelerate_deepspeed_env, resolve_parallel_options, world_size_from_env
from .trainer import check_complete_checkpoint, is_complete_checkpoint, last_complete_checkpoint

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.yaml"
# Model fields that may change when training continues from a checkpoint (`--model_name_or_path`).
CONTINUATION_FLAGS = (
    "l1_coef_init",
    "l1_coef_multiplier",
    "load_balance",
    "router_aux_loss_coef",
    "router_aux_loss_reduction",
    "router_renormalize",
    "router_sampling",
)
# The knobs of the ReMoE paper's other baselines, each with the router type it applies to: a flag given for another
# router is refused (`remoe compare` passes each only to the runs of its router).
ROUTER_SPECIFIC_FLAGS = {
    "router_hash_seed": "hash",
    "router_capacity_factor": "expert_choice",
    "router_jitter_eps": "sparsemixer",
    "router_segment_length": "lory",
}
# CLI flags that land in the model config; everything else that is not None goes to `data` or `training`.
MODEL_FLAGS = (
    "router_type",
    "num_experts",
    "num_experts_per_tok",
    "granularity",
    *CONTINUATION_FLAGS,
    *ROUTER_SPECIFIC_FLAGS,
)
DATA_FLAGS = ("dataset", "domains", "tokenizer", "text_column", "block_size", "vocab_size", "max_eval_blocks")
TRAINING_FLAGS = (
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "logging_steps",
    "save_steps",
    "seed",
    "bf16",
)
# The `data` section: (allowed types, smallest value or None), defaults where remoe sets one.
DATA_FIELDS: dict[str, tuple[tuple[type, ...], int | None]] = {
    "dataset": ((str,), None),
    "domains": ((list,), None),
    "tokenizer": ((str,), None),
    "text_column": ((str,), None),
    "block_size": ((int,), 2),
    "vocab_size": ((int,), 258),
    "max_eval_blocks": ((int,), 1),
}
DATA_DEFAULTS = {"dataset": "builtin", "vocab_size": 8192, "max_eval_blocks": 64}
# Fields the tokenizer decides for a new model; set `data.vocab_size` (or `--tokenizer`) instead.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
# `TrainingArguments` fields that `remoe train` sets itself, with the flag to use instead. (`seed`, `data_seed` and
# `report_to` have remoe defaults that the training section may change: `build_training_arguments`.)
REMOE_TRAINING_FIELDS = {
    "output_dir": "--output_dir",
    "save_strategy": "--save_steps",
    "eval_strategy": "(remoe train evaluates once at the end)",
    "dataloader_drop_last": "(remoe train drops the last partial batch)",
}
# What remoe passes to `TrainingArguments` unless the training section says otherwise. `logging_nan_inf_filter` is off
# so that a NaN/inf loss reaches the log (and stops the run, `train.NonFiniteLossCallback`) instead of being hidden.
TRAINING_DEFAULTS: dict[str, Any] = {"report_to": ["tensorboard"], "logging_nan_inf_filter": False}
# The numbers of the `training` section: field -> (what is allowed, test). NaN fails every test.
_AT_LEAST_ONE = ("an integer >= 1", lambda value: value >= 1)
_POSITIVE = ("a finite number > 0", lambda value: 0 < value < math.inf)
_NON_NEGATIVE = ("a finite number >= 0", lambda value: 0 <= value < math.inf)
_BELOW_ONE = ("a number in [0, 1)", lambda value: 0 <= value < 1)
_STEPS = (
    "an integer >= 1, or a fraction of max_steps in (0, 1)",
    lambda value: 0 < value < math.inf and (value < 1 or value == int(value)),
)
_SEED = ("an integer in [0, 2**32 - 1]", lambda value: 0 <= value < 2**32)
TRAINING_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_steps": _AT_LEAST_ONE,
    "per_device_train_batch_size": _AT_LEAST_ONE,
    "per_device_eval_batch_size": _AT_LEAST_ONE,
    "gradient_accumulation_steps": _AT_LEAST_ONE,
    "eval_accumulation_steps": _AT_LEAST_ONE,
    "save_total_limit": _AT_LEAST_ONE,
    "torch_empty_cache_steps": _AT_LEAST_ONE,
    "dataloader_prefetch_factor": _AT_LEAST_ONE,
    "ddp_bucket_cap_mb": _AT_LEAST_ONE,
    "ddp_timeout": _AT_LEAST_ONE,
    "dataloader_num_workers": ("an integer >= 0", lambda value: value >= 0),
    "seed": _SEED,
    "data_seed": _SEED,
    "learning_rate": _POSITIVE,
    "num_train_epochs": _POSITIVE,
    "adam_epsilon": _POSITIVE,
    "neftune_noise_alpha": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": ("a finite number >= 0 (0 turns gradient clipping off)", lambda value: 0 <= value < math.inf),
    "eval_delay": _NON_NEGATIVE,
    "adam_beta1": _BELOW_ONE,
    "adam_beta2": _BELOW_ONE,
    "label_smoothing_factor": _BELOW_ONE,
    "warmup_steps": (
        "an integer >= 0 (steps), or a fraction of max_steps in [0, 1)",
        lambda value: 0 <= value < math.inf and (value < 1 or value == int(value)),
    ),
    "logging_steps": _STEPS,
    "save_steps": _STEPS,
    "eval_steps": _STEPS,
}
# Scheduler arguments the Trainer passes itself (`transformers.optimization.get_scheduler`), and `last_epoch`, which
# only a resume sets (through the scheduler's state).
_SCHEDULER_OWN_ARGUMENTS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")
# Schedulers `get_scheduler` builds without `lr_scheduler_kwargs`, and those that need an evaluation every few steps.
_SCHEDULERS_WITHOUT_KWARGS = ("constant", "constant_with_warmup")
_SCHEDULERS_NEEDING_EVALUATION = ("reduce_lr_on_plateau", "greedy")
_SCHEDULER_RATES = ("min_lr_rate", "warmup_lr_rate", "min_lr_ratio")
_WSD_SHAPES = ("linear", "cosine", "1-sqrt")
# A number in text (a quoted one, or `1e-3`: PyYAML 1.1 reads an exponent without a dot as a string), and the
# exponent form alone.
_NUMBER_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_EXPONENT_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
PARALLEL_FIELDS = ("deepspeed", "expert_parallel_size")
# `training` keys of remoe's own: TopK's near-dense warmup (k experts for the first steps; the ReMoE paper's baseline).
WARMUP_FIELDS = ("topk_warmup_k", "topk_warmup_steps")
PAPER_PRESETS = ("182m", "469m", "978m")
ADAM_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and AdamW's two moments


def _did_you_mean(name: str, allowed: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(section: str, values: dict[str, Any], allowed: typing.Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for name in values:
        if name not in allowed:
            raise ValueError(f"{where}: unknown key {section}.{name}{_did_you_mean(name, allowed)}")


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a `TrainingArguments` field annotation (unknown annotations accept anything)."""
    if hint is Any or hint is None:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (str, hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is not None and isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_model_section(model: dict[str, Any], where: str) -> None:
    """Keys, types and values of the `model` section, through `ReMoEConfig` itself."""
    fields = {field.name for field in dataclasses.fields(ReMoEConfig)} | {"experts_implementation"}
    for name in TOKENIZER_FIELDS:
        if name in model:
            raise ValueError(
                f"{where}: model.{name} comes from the tokenizer; set data.vocab_size (trained tokenizer) or "
                "data.tokenizer instead"
            )
    _check_keys("model", model, fields, where)
    try:
        ReMoEConfig(**model)
    except (TypeError, ValueError, StrictDataclassFieldValidationError) as error:
        raise ValueError(f"{where}: model section: {' '.join(str(error).split())}") from error


def check_data_section(data: dict[str, Any], where: str) -> None:
    _check_keys("data", data, DATA_FIELDS, where)
    for name, value in data.items():
        kinds, minimum = DATA_FIELDS[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            allowed = " or ".join(kind.__name__ for kind in kinds)
            raise ValueError(f"{where}: data.{name} must be {allowed}, got {_type_name(value)}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{where}: data.{name} must be >= {minimum}, got {value}")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{where}: data.{name} is empty; give a value or remove the key to use the default")
        if name == "domains" and (not value or not all(isinstance(domain, str) for domain in value)):
            raise ValueError(f"{where}: data.domains must be a non-empty list of domain names, got {value!r}")


def check_training_section(training: dict[str, Any], where: str) -> None:
    """Keys, types, ranges and enumerated values of the `training` section against `TrainingArguments`' fields, the
    learning-rate scheduler's arguments and the reporting integrations. (`check_with_training_arguments` then builds a
    throwaway `TrainingArguments` where that is free of side effects.)"""
    hints = typing.get_type_hints(TrainingArguments)
    fields = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    for name, flag in REMOE_TRAINING_FIELDS.items():
        if name in training:
            raise ValueError(f"{where}: training.{name} is set by remoe train; use {flag}")
    _check_keys("training", training, fields | set(PARALLEL_FIELDS) | set(WARMUP_FIELDS), where)
    for name, value in training.items():
        if name not in hints:
            continue
        if not _matches(value, hints[name]):
            hint = ""
            if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()) and float(value).is_integer():
                hint = f" (YAML 1.1 reads {value} as text: write {int(float(value))})"
            raise ValueError(
                f"{where}: training.{name} must be {_describe_hint(hints[name])}, got {_type_name(value)}{hint}"
            )
        choices = _enum_values(hints[name])
        if choices and isinstance(value, str) and value not in choices:
            raise ValueError(
                f"{where}: training.{name} must be one of {sorted(choices)}, got {value!r}"
                f"{_did_you_mean(value, choices)}"
            )
    for name, (allowed, test) in TRAINING_RANGES.items():
        value = training.get(name)
        if value is not None and not test(value):
            raise ValueError(f"{where}: training.{name} must be {allowed}, got {value!r}")
    _check_scheduler(training, where)
    _check_report_to(training.get("report_to"), where)


def _describe_hint(hint: Any) -> str:
    """A field annotation as the user writes it: `float`, `int | null`, `SchedulerType | str`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_describe_hint(member) for member in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _float_fields(cls: type) -> set[str]:
    """The dataclass fields of `cls` annotated as a number that may be a float (and not text)."""
    try:
        hints = typing.get_type_hints(cls, localns={"torch": torch})
    except (NameError, TypeError):
        return set()
    floats = set()
    for name, hint in hints.items():
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if float in members and str not in members:
            floats.add(name)
    return floats


def _numbers_from_text(values: dict[str, Any], names: typing.Iterable[str], pattern: re.Pattern = _NUMBER_TEXT) -> None:
    """Turn the numbers written as text that match `pattern` into floats, for the fields `names`."""
    for name in names:
        value = values.get(name)
        if isinstance(value, str) and pattern.fullmatch(value.strip()):
            values[name] = float(value)


def normalize_numbers(run: dict[str, dict]) -> None:
    """The float fields of the `training` and `model` sections written as text (`1e-3`: YAML 1.1 reads an exponent
    without a dot as a string) become floats, the user's intent being unambiguous; so do the exponent-form values of
    the scheduler's and RoPE's arguments (e.g. `rope_theta: 1e6`)."""
    _numbers_from_text(run["training"], _float_fields(TrainingArguments))
    kwargs = run["training"].get("lr_scheduler_kwargs")
    if isinstance(kwargs, dict):
        _numbers_from_text(kwargs, list(kwargs), _EXPONENT_TEXT)
    _numbers_from_text(run["model"], _float_fields(ReMoEConfig))
    rope = run["model"].get("rope_parameters")
    if isinstance(rope, dict):
        _numbers_from_text(rope, [name for name in rope if name != "rope_type"], _EXPONENT_TEXT)


def _check_scheduler(training: dict[str, Any], where: str) -> None:
    """`lr_scheduler_kwargs` against the signature of the scheduler function (`TYPE_TO_SCHEDULER_FUNCTION`) that the
    Trainer will call, and the schedulers remoe cannot run."""
    name = training.get("lr_scheduler_type", "linear")
    name = name.value if isinstance(name, SchedulerType) else str(name)
    kwargs = training.get("lr_scheduler_kwargs")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ValueError(
                f"{where}: training.lr_scheduler_kwargs must be a mapping such as {{min_lr_rate: 0.1}}, got "
                f"{training['lr_scheduler_kwargs']!r}"
            )
    kwargs = kwargs or {}
    if name in _SCHEDULERS_NEEDING_EVALUATION:
        raise ValueError(
            f"{where}: training.lr_scheduler_type {name!r} needs an evaluation every few steps, and remoe train "
            "evaluates once, at the end; use another scheduler (e.g. cosine)"
        )
    if name in _SCHEDULERS_WITHOUT_KWARGS:
        if kwargs:
            raise ValueError(
                f"{where}: training.lr_scheduler_kwargs {sorted(kwargs)}: lr_scheduler_type {name!r} takes no "
                "arguments (Transformers would ignore them); remove lr_scheduler_kwargs"
            )
        return
    function = TYPE_TO_SCHEDULER_FUNCTION.get(SchedulerType(name))
    if function is None:
        return
    parameters = {
        parameter.name: parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.name not in _SCHEDULER_OWN_ARGUMENTS and parameter.kind is not inspect.Parameter.VAR_KEYWORD
    }
    for key in kwargs:
        if key not in parameters:
            takes = ", ".join(parameters) or "no arguments"
            raise ValueError(
                f"{where}: training.lr_scheduler_kwargs.{key} is not an argument of lr_scheduler_type {name!r} "
                f"(it takes: {takes}){_did_you_mean(str(key), parameters)}"
            )
    missing = [key for key, parameter in parameters.items() if parameter.default is inspect.Parameter.empty]
    missing = [key for key in missing if key not in kwargs]
    if missing:
        raise ValueError(
            f"{where}: lr_scheduler_type {name!r} needs training.lr_scheduler_kwargs.{missing[0]} "
            f"(e.g. lr_scheduler_kwargs: {{{missing[0]}: ...}})"
        )
    if "min_lr" in parameters and "min_lr_rate" in parameters:
        given = [key for key in ("min_lr", "min_lr_rate") if kwargs.get(key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{where}: lr_scheduler_type {name!r} needs exactly one of training.lr_scheduler_kwargs.min_lr "
                f"(the final learning rate) and .min_lr_rate (its ratio to learning_rate), got "
                f"{', '.join(given) or 'neither'} (e.g. lr_scheduler_kwargs: {{min_lr_rate: 0.1}})"
            )
    for key, value in kwargs.items():
        _check_scheduler_value(key, value, parameters[key], where)
    if "lr_end" in parameters:
        lr_end = kwargs.get("lr_end", parameters["lr_end"].default)
        learning_rate = training.get("learning_rate", _training_default("learning_rate"))
        if isinstance(lr_end, int | float) and not lr_end < learning_rate:
            raise ValueError(
                f"{where}: training.lr_scheduler_kwargs.lr_end ({lr_end}) must be smaller than training.learning_rate "
                f"({learning_rate})"
            )


def _check_scheduler_value(key: str, value: Any, parameter: inspect.Parameter, where: str) -> None:
    """One scheduler argument: a number (>= 0; a rate in [0, 1]) where its default is one, or one of the shapes."""
    field = f"training.lr_scheduler_kwargs.{key}"
    if key in ("warmup_type", "decay_type"):
        if value not in _WSD_SHAPES:
            raise ValueError(f"{where}: {field} must be one of {list(_WSD_SHAPES)}, got {value!r}")
        return
    numeric = isinstance(parameter.default, int | float) and not isinstance(parameter.default, bool)
    if not (numeric or parameter.default is None or parameter.default is inspect.Parameter.empty):
        return
    if value is None and parameter.default is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {field} must be a number, got {_type_name(value)}")
    if key in _SCHEDULER_RATES:
        if not 0 <= value <= 1:
            raise ValueError(f"{where}: {field} must be a ratio in [0, 1], got {value!r}")
    elif not 0 <= value < math.inf:
        raise ValueError(f"{where}: {field} must be a finite number >= 0, got {value!r}")


def _check_report_to(value: Any, where: str) -> None:
    """`report_to`: `none`, `all`, or the names of installed reporting integrations (default: tensorboard)."""
    if value is None:
        return
    names = [value] if isinstance(value, str) else value
    known = sorted(INTEGRATION_TO_CALLBACK)
    for name in names:
        if not isinstance(name, str) or (name not in known and name not in ("none", "all")):
            raise ValueError(
                f"{where}: training.report_to must be 'none', 'all' or among {known}, got {name!r}"
                f"{_did_you_mean(str(name), known)}"
            )
        if name in ("none", "all") and len(names) > 1:
            raise ValueError(f"{where}: training.report_to {name!r} stands alone, got {names!r}")
    available = get_available_reporting_integrations()
    missing = [name for name in names if name not in ("none", "all") and name not in available]
    if missing:
        raise ValueError(
            f"{where}: training.report_to {missing[0]!r} is not installed here (installed: "
            f"{', '.join(available) or 'none'}); install it or choose another"
        )


def _training_default(name: str) -> Any:
    return next(field.default for field in dataclasses.fields(TrainingArguments) if field.name == name)


def check_with_training_arguments(training: dict[str, Any], where: str, *, deepspeed: Any = None) -> None:
    """Build the run's `TrainingArguments` once, in a temporary folder, to find what only its own checks know (e.g.
    `load_best_model_at_end` without evaluation, fp16 with bf16, bf16 on a GPU without it) before any work.

    Skipped under a launcher (WORLD_SIZE > 1) or with DeepSpeed: there, building one sets up the process group or the
    DeepSpeed state. In one process it writes nothing and leaves only Accelerate's `PartialState` (which the run's own
    `TrainingArguments` resets); the explicit checks of `check_training_section` hold in every case."""
    if deepspeed or any(accelerate_deepspeed_env()) or world_size_from_env() > 1:
        return
    with tempfile.TemporaryDirectory(prefix="remoe-check-") as folder:
        try:
            build_training_arguments(training, output_dir=Path(folder) / "output", seed=training.get("seed", 42))
        except (ValueError, TypeError, KeyError, NotImplementedError, ImportError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
            named = [name for name in training if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None]
            fields = ", ".join(f"training.{name}" for name in named) if named else "the training section"
            raise ValueError(f"{where}: {fields}: refused by TrainingArguments: {message}") from error


def build_training_arguments(
    training: dict[str, Any], *, output_dir: Path, seed: int, deepspeed: str | dict | None = None
) -> TrainingArguments:
    """`TrainingArguments` from a `training` section plus what `remoe train` always sets (and its defaults)."""
    values = {name: value for name, value in training.items() if name not in ("seed", *WARMUP_FIELDS, *PARALLEL_FIELDS)}
    for name, value in TRAINING_DEFAULTS.items():
        values.setdefault(name, list(value) if isinstance(value, list) else value)
    values.setdefault("data_seed", seed)
    # Without an accelerator, the Trainer must be told: with DeepSpeed it would otherwise set up one process per rank.
    values.setdefault("use_cpu", trains_on_cpu(values))
    values.setdefault("dataloader_pin_memory", has_accelerator())
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        save_strategy="steps",
        eval_strategy="no",
        dataloader_drop_last=True,
        deepspeed=deepspeed,
        **values,
    )


def _enum_values(hint: Any) -> set[str]:
    """The values of the enums in a field annotation (e.g. `SchedulerType | str`)."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {
        item.value
        for member in members
        if isinstance(member, type) and issubclass(member, enum.Enum)
        for item in member
        if isinstance(item.value, str)
    }


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def trains_on_cpu(training: dict[str, Any]) -> bool:
    """Whether the run's `training` section trains on CPU: `use_cpu` where given, else when there is no accelerator."""
    return training.get("use_cpu", not has_accelerator())


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One checked `remoe train` run: what `plan_run` resolved from the preset or file and the flags.

    `sections` is the run's identity (`model`, `data`, `training`, written to `run_config.yaml`); `model_config` is
    the model it trains (the vocabulary is completed by the tokenizer of the data stage); the rest is how to run it.
    """

    sections: dict[str, dict]
    model_config: ReMoEConfig
    output_dir: Path
    seed: int
    deepspeed: str | dict | None = None
    expert_parallel_size: int = 1
    resume_from_checkpoint: str | None = None
    overwrite: bool = False
    model_name_or_path: str | None = None
    streaming: bool = False
    freeze_experts: bool = False
    num_proc: int | None = None
    model_dtype: str = "float32"

    @property
    def topk_warmup(self) -> tuple[int, int] | None:
        """`(k, steps)` of TopK's near-dense warmup, or None."""
        training = self.sections["training"]
        if training.get("topk_warmup_k") is None:
            return None
        return training["topk_warmup_k"], training["topk_warmup_steps"]

    @property
    def data(self) -> dict[str, Any]:
        return self.sections["data"]

    def training_arguments(self) -> TrainingArguments:
        """The run's `TrainingArguments`: the `training` section plus what `remoe train` always sets."""
        return build_training_arguments(
            self.sections["training"], output_dir=self.output_dir, seed=self.seed, deepspeed=self.deepspeed
        )


def plan_run(options: dict[str, Any]) -> RunConfig:
    """Every check of `remoe train` before any work: the sections (`resolve_run`), the parallel layout, the memory
    the model needs, the streaming options and the output folder (changing nothing on disk)."""
    run, config = _resolve(options)
    parallel = resolve_parallel_options(options, run, config)
    run["training"] = {name: value for name, value in run["training"].items() if name not in PARALLEL_FIELDS}
    run["training"].setdefault("seed", 42)
    model_name_or_path = options.get("model_name_or_path")
    if not model_name_or_path:
        sharded = parallel["deepspeed"] is not None or parallel["expert_parallel_size"] > 1
        check_memory(config, world_size_from_env(), sharded)
    streaming = bool(options.get("streaming"))
    if streaming and (not (run["data"].get("tokenizer") or model_name_or_path) or run["data"].get("domains")):
        raise ValueError("--streaming needs --tokenizer (or --model_name_or_path) and does not take --domains")
    run_name = Path(options["config"]).stem if options.get("config") else options.get("preset") or "tiny"
    output_dir = Path(options.get("output_dir") or f"outputs/{run_name}-{run['model']['router_type']}")
    overwrite = bool(options.get("overwrite"))
    resume = check_output_dir(output_dir, run, resume=options.get("resume_from_checkpoint"), overwrite=overwrite)
    return RunConfig(
        sections=run,
        model_config=config,
        output_dir=output_dir,
        seed=run["training"]["seed"],
        deepspeed=parallel["deepspeed"],
        expert_parallel_size=parallel["expert_parallel_size"],
        resume_from_checkpoint=resume,
        overwrite=overwrite,
        model_name_or_path=model_name_or_path,
        streaming=streaming,
        freeze_experts=bool(options.get("freeze_experts")),
        num_proc=options.get("num_proc"),
        model_dtype=options.get("model_dtype") or "float32",
    )


def resolve_run(options: dict[str, Any]) -> dict[str, dict]:
    """Merge the preset (or `--config` file) with the command-line overrides and check the result before any work."""
    return _resolve(options)[0]


def _resolve(options: dict[str, Any]) -> tuple[dict[str, dict], ReMoEConfig]:
    """The run's sections and the model config they describe (the checkpoint's with `--model_name_or_path`)."""
    if options.get("config") and options.get("preset"):
        raise ValueError("--config and --preset both choose the run's sections: pass one of them")
    source = options.get("config") or options.get("preset") or "tiny"
    run = load_preset(source)
    where = str(source)
    if Path(source).suffix in (".yaml", ".yml"):
        check_run_file(Path(source))
    for section, names in (("model", MODEL_FLAGS), ("data", DATA_FLAGS), ("training", TRAINING_FLAGS + WARMUP_FIELDS)):
        run[section].update({name: options[name] for name in names if options.get(name) is not None})
    for name, value in DATA_DEFAULTS.items():
        run["data"].setdefault(name, value)
    normalize_numbers(run)
    _check_data_flags(options)
    if source in PAPER_PRESETS and run["data"]["dataset"] == "builtin":
        logger.warning(
            "--preset %s has the paper's model and recipe, but trains on the built-in corpus (about 9 MB of text) "
            "with a tokenizer trained on it; the paper used The Pile and GPT-2's tokenizer: pass --dataset and "
            "--tokenizer to reproduce it",
            source,
        )
    if not options.get("model_name_or_path"):  # else the checkpoint's router; `_continued_model` refuses the knobs
        _check_router_specific_flags(options, run["model"].get("router_type", "relu"))
    if not options.get("model_name_or_path"):
        check_model_section(run["model"], where)
    check_data_section(run["data"], where)
    check_training_section(run["training"], where)
    deepspeed = options.get("deepspeed") or run["training"].get("deepspeed")
    check_with_training_arguments(run["training"], where, deepspeed=deepspeed)
    if "block_size" not in run["data"]:
        raise ValueError(f"{where}: data.block_size is required (tokens per training sequence)")
    if run["training"].get("max_steps") is None:
        raise ValueError(f"{where}: training.max_steps is required")
    if options.get("model_name_or_path"):
        config = _continued_model(options, run, where)
    else:
        config = ReMoEConfig(**run["model"], vocab_size=run["data"]["vocab_size"])
    if options.get("model_dtype") and not options.get("model_name_or_path"):
        raise ValueError("--model_dtype applies to --model_name_or_path (a new model is always built in float32)")
    if (config.uses_l1_controller or config.uses_balancing_loss) and run["training"].get("label_smoothing_factor"):
        raise ValueError(
            f"{where}: training.label_smoothing_factor makes the Trainer compute the loss from the logits alone, "
            f"without the {'ReMoE regulariser' if config.uses_l1_controller else 'balancing loss'} of "
            f"router_type={config.router_type!r}; leave it at 0"
        )
    _check_topk_warmup(run["training"], config, where)
    _check_experts_device(run["training"], config, where)
    if config.router_type == "lory" and config.segment_length >= run["data"]["block_size"]:
        if options.get("router_segment_length"):
            source = "--router_segment_length"
        elif config.router_segment_length is not None:
            source = f"{where}: model.router_segment_length"
        else:
            source = "router_segment_length (default: min(256, max_position_embeddings // 4))"
        raise ValueError(
            f"{source}: lory's segments of {config.segment_length} tokens must be shorter than data.block_size "
            f"({run['data']['block_size']}): a sequence of one segment is routed by itself with stop-gradient, so "
            "the router would never train; pass --router_segment_length below the block size (Lory: 256 of 4096)"
        )
    if options.get("freeze_experts") and not config.has_experts:
        raise ValueError("--freeze_experts: the model is dense (router_type='dense'), it has no experts to freeze")
    if run["data"]["block_size"] > config.max_position_embeddings:
        raise ValueError(
            f"data.block_size ({run['data']['block_size']}) exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); use a block size of at most {config.max_position_embeddings}"
        )
    return run, config


def _check_data_flags(options: dict[str, Any]) -> None:
    """Tokenizer flags that would otherwise be ignored without a word: an empty `--tokenizer` (it would mean the
    trained BPE) and `--vocab_size` where the tokenizer comes from `--tokenizer` or `--model_name_or_path`."""
    if options.get("tokenizer") is not None and not str(options["tokenizer"]).strip():
        raise ValueError(
            "--tokenizer is empty: give a tokenizer folder or Hub name, or leave --tokenizer out to train a BPE "
            "tokenizer on the corpus"
        )
    if options.get("vocab_size") is None:
        return
    for flag in ("model_name_or_path", "tokenizer"):
        if options.get(flag):
            raise ValueError(
                f"--vocab_size {options['vocab_size']} sizes the BPE tokenizer trained on the corpus, and "
                f"--{flag} brings its own tokenizer, so it would be ignored; drop --vocab_size (or --{flag})"
            )


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line}")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the last one silently).
    Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first_line = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first_line != key_node.start_mark.line + 1:
                    raise _DuplicateKeyError(key, key_node.start_mark.line + 1, first_line)
        return super().construct_mapping(node, deep=deep)


def check_run_file(path: Path) -> None:
    """What `load_preset` (PyYAML's SafeLoader) lets through in a run file: a key given twice at any level (the last
    one would win silently), an empty file and an empty section (both would mean the defaults)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return  # `load_preset` reports it
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        content = loader.construct_document(node) if node is not None else None
    except _DuplicateKeyError as error:
        raise ValueError(
            f"{path}: duplicate key {error.key!r} at line {error.line} (first at line {error.first_line}); YAML "
            "would keep only the last one: merge them into one"
        ) from error
    except yaml.YAMLError:
        return  # `load_preset` reports it
    finally:
        loader.dispose()
    if content is None:
        raise ValueError(f"{path}: the file is empty; write its model, data and training sections (or use --preset)")
    if not isinstance(content, dict) or not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(value_node, yaml.ScalarNode) and value_node.tag == "tag:yaml.org,2002:null":
            raise ValueError(
                f"{path}: section {key_node.value!r} (line {key_node.start_mark.line + 1}) is empty; give its keys "
                "or remove the line to use the defaults"
            )


def _check_router_specific_flags(options: dict[str, Any], router_type: str) -> None:
    """A router knob given on the command line must be the run's router's (`ROUTER_SPECIFIC_FLAGS`)."""
    for name, applies_to in ROUTER_SPECIFIC_FLAGS.items():
        if options.get(name) is not None and router_type != applies_to:
            raise ValueError(
                f"--{name} applies to router_type {applies_to!r} only; this run's router_type is {router_type!r}"
            )


def _check_experts_device(training: dict[str, Any], config: ReMoEConfig, where: str) -> None:
    """`triton` computes on CUDA (or on CPU under `TRITON_INTERPRET=1`): refused for a run that trains on CPU."""
    if (
        config._experts_implementation == "triton"
        and trains_on_cpu(training)
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise ValueError(
            f"{where}: model.experts_implementation 'triton' needs CUDA (or TRITON_INTERPRET=1 on CPU), and this run "
            "trains on CPU; use 'grouped_mm' or 'eager'"
        )


def _check_topk_warmup(training: dict[str, Any], config: ReMoEConfig, where: str) -> None:
    given = [name for name in WARMUP_FIELDS if training.get(name) is not None]
    if not given:
        return
    if len(given) == 1:
        missing = next(name for name in WARMUP_FIELDS if name not in given)
        raise ValueError(f"{where}: training.{given[0]} needs training.{missing} as well")
    if config.router_type != "topk":
        raise ValueError(f"{where}: topk_warmup_k applies to router_type='topk', got {config.router_type!r}")
    top_k, steps = training["topk_warmup_k"], training["topk_warmup_steps"]
    for name, value in (("topk_warmup_k", top_k), ("topk_warmup_steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: training.{name} must be an integer >= 1, got {value!r}")
    if top_k > config.num_routed_experts:
        raise ValueError(
            f"{where}: training.topk_warmup_k must be at most the {config.num_routed_experts} routed experts, "
            f"got {top_k}"
        )


def _continued_model(options: dict[str, Any], run: dict[str, dict], where: str) -> ReMoEConfig:
    """`--model_name_or_path`: the checkpoint's config (checked against its weights) with the controller overrides.

    The architecture is the checkpoint's: flags may not change it, and the architecture keys of a `model` section in
    the run file (e.g. the preset the seed was trained with) are checked for typos, then ignored with a warning where
    they differ."""
    changed = [name for name in MODEL_FLAGS if options.get(name) is not None and name not in CONTINUATION_FLAGS]
    if changed:
        raise ValueError(
            f"--model_name_or_path keeps the checkpoint's architecture; {', '.join(changed)} cannot be changed "
            f"(allowed: {', '.join(CONTINUATION_FLAGS)})"
        )
    fields = {field.name for field in dataclasses.fields(ReMoEConfig)} | {"experts_implementation"}
    _check_keys("model", run["model"], fields, where)
    config = check_checkpoint(options["model_name_or_path"])
    differing = [
        f"{name}={value!r} (the checkpoint has {getattr(config, name, None)!r})"
        for name, value in run["model"].items()
        if name not in CONTINUATION_FLAGS and getattr(config, name, None) != value
    ]
    if differing:
        logger.warning(
            "--model_name_or_path keeps the checkpoint's architecture; ignoring the model section of %s: %s",
            where,
            ", ".join(differing),
        )
    overrides = apply_continuation_overrides(config, options, run, where)
    run["model"] = {**overrides, "router_type": config.router_type}
    return config


def apply_continuation_overrides(
    config: ReMoEConfig, options: dict[str, Any], run: dict[str, dict], where: str
) -> dict[str, Any]:
    """Set the continuation values (`CONTINUATION_FLAGS`: the run file's `model` section, then the flags) on the
    checkpoint's `config`, check them, and return them."""
    overrides = {name: run["model"][name] for name in CONTINUATION_FLAGS if name in run["model"]}
    overrides.update({name: options[name] for name in CONTINUATION_FLAGS if options.get(name) is not None})
    try:
        for name, value in overrides.items():
            setattr(config, name, value)
        config._check_values()
    except (TypeError, ValueError, StrictDataclassFieldValidationError) as error:
        raise ValueError(f"{where}: {' '.join(str(error).split())}") from error
    return overrides


def parameter_count(config: ReMoEConfig) -> int:
    """Parameters of the model `config` describes (counted on the meta device: nothing is allocated)."""
    from remoe import ReMoEForCausalLM

    with torch.device("meta"):
        model = ReMoEForCausalLM(config)
    return sum(parameter.numel() for parameter in model.parameters())


def check_memory(config: ReMoEConfig, processes: int, sharded: bool) -> None:
    """Refuse a model whose weights, gradients and AdamW state cannot fit this machine, before any work."""
    count = parameter_count(config)
    needed = count * ADAM_BYTES_PER_PARAMETER / (processes if sharded else 1)
    if torch.cuda.is_available():
        available, where = torch.cuda.get_device_properties(0).total_memory, "the GPU has"
    else:
        available, where = psutil.virtual_memory().available / max(processes, 1), "this machine has"
    if needed > available:
        raise ValueError(
            f"the model has {count / 1e9:.2f}B parameters: training needs about {needed / 2**30:.1f} GiB per process "
            f"for fp32 weights, gradients and AdamW state ({ADAM_BYTES_PER_PARAMETER} bytes per parameter), "
            f"{where} {available / 2**30:.1f} GiB available; use fewer or smaller experts, or shard with DeepSpeed "
            "(--deepspeed, --expert_parallel_size)"
        )


def check_writable_folder(folder: str | os.PathLike, flag: str, *, create: bool = True) -> Path:
    """Prove that `folder` is (or can be created as) a writable folder, with a one-line error naming `flag`.

    With `create=False` nothing is left behind: the probe file goes into the nearest folder that exists."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(folder)!r}: cannot create it, {str(existing)!r} is a file")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".remoe-write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {str(folder)!r}: cannot write there ({error.strerror or error})") from error
    return folder


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(
    output_dir: Path, run: dict[str, dict], *, resume: str | bool | None, overwrite: bool
) -> str | None:
    """Check `output_dir` against the request, changing nothing; returns the checkpoint to resume from (or None).

    A folder holding anything is refused unless `resume` continues the run in it (its `run_config.yaml` must have the
    same model and data sections) or `overwrite` replaces it. The folder must be writable (or creatable).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} is a file, not a folder")
    if resume and overwrite:
        raise ValueError(
            "--resume_from_checkpoint continues the run in --output_dir, --overwrite replaces it: pick one"
        )
    existing = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    checkpoint = None
    if resume:
        checkpoint = _resume_checkpoint(output_dir, resume)
        _check_same_run(output_dir, run)
        _check_checkpoint_architecture(Path(checkpoint), run)
    elif existing and not overwrite and _is_main_process():
        # Rank 0 decides (and fails the launch); the other ranks may start after it wrote run_config.yaml.
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise ValueError(
            f"--output_dir {str(output_dir)!r} already holds files ({shown}); pass --resume_from_checkpoint to "
            "continue that run, --overwrite to replace it, or choose another --output_dir"
        )
    check_writable_folder(output_dir, "--output_dir", create=False)
    return checkpoint


def claim_output_dir(run: RunConfig) -> None:
    """Make the output folder this run's (once every input has been read): with `overwrite` empty it first, then
    write the run's identity `run_config.yaml`. Rank 0 only."""
    if not _is_main_process():
        return
    if run.overwrite and run.output_dir.is_dir():
        for path in run.output_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    write_run_config(run.output_dir, run.sections)


def _resume_checkpoint(output_dir: Path, resume: str | bool) -> str:
    if resume is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint: no complete checkpoint-N in {output_dir} to resume from")
        return checkpoint
    folder = Path(resume)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {str(resume)!r} is not a checkpoint folder")
    if not is_complete_checkpoint(folder) and (folder / "config.json").is_file() and not any(folder.glob("trainer*")):
        raise ValueError(
            f"--resume_from_checkpoint {str(resume)!r} is a model folder, not a Trainer checkpoint-N: resume from one "
            "of its checkpoint-N folders, or continue training from its weights with --model_name_or_path"
        )
    check_complete_checkpoint(folder)
    return str(folder)


def _check_checkpoint_architecture(checkpoint: Path, run: dict[str, dict]) -> None:
    """The checkpoint to resume must hold the model this run builds (its config.json against the model section)."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume_from_checkpoint: {checkpoint / 'config.json'} is unreadable ({error})") from error
    differences = [
        f"{name}: {saved[name]!r} there, {value!r} asked"
        for name, value in run["model"].items()
        if name not in CONTINUATION_FLAGS and name in saved and saved[name] != value
    ]
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {str(checkpoint)!r} holds another model ({'; '.join(differences[:4])}); "
            "resume with the settings it was trained with, or start a new run"
        )


def _check_same_run(output_dir: Path, run: dict[str, dict]) -> None:
    """A resumed run must have the model and data of the run that wrote `output_dir`."""
    path = output_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return
    try:
        previous = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: unreadable run configuration ({error})") from error
    differences = [
        f"{section}.{key}: {previous.get(section, {}).get(key)!r} -> {run[section].get(key)!r}"
        for section in ("model", "data")
        for key in sorted(set(previous.get(section, {})) | set(run[section]))
        if previous.get(section, {}).get(key) != run[section].get(key)
    ]
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint: {output_dir} holds a run with another model or data "
            f"({'; '.join(differences[:4])}); resume it with its own settings or start a new --output_dir"
        )


def write_run_config(output_dir: Path, run: dict[str, dict]) -> None:
    """`run_config.yaml`, written atomically: the run's identity (checked on resume and by `remoe compare`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staged = output_dir / f".{RUN_CONFIG_FILE}.{uuid.uuid4().hex[:8]}"
    staged.write_text(yaml.safe_dump(run))
    os.replace(staged, output_dir / RUN_CONFIG_FILE)
