"""The run configuration of `remoe train`: a preset or YAML file plus command-line flags, checked before any work.

A run has three sections, each with a closed set of keys:

- `model`: `ReMoEConfig` fields (the vocabulary and special tokens come from the tokenizer);
- `data`: `DATA_FIELDS`;
- `training`: `TrainingArguments` fields, plus `deepspeed` and `expert_parallel_size`.

`plan_run` turns the options of `remoe train` into a `RunConfig`: it merges the file and the flags (`resolve_run`) and
checks every key ("did you mean ..." for unknown ones), every type and range (naming the field), the combinations, the
parallel layout (`remoe.training.distributed`), the machine (memory for the model, bf16) and the output folder. A
non-empty output folder is never reused silently: it is refused unless the run resumes it (same model and data as its
`run_config.yaml`) or `--overwrite` asks to replace it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import os
import shutil
import tempfile
import types
import typing
import uuid
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import TrainingArguments

from remoe import ReMoEConfig
from remoe.checkpoints import check_checkpoint
from remoe.configuration import load_preset

from .distributed import resolve_parallel_options, world_size_from_env
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
# `TrainingArguments` fields that `remoe train` sets itself, with the flag to use instead.
REMOE_TRAINING_FIELDS = {
    "output_dir": "--output_dir",
    "save_strategy": "--save_steps",
    "eval_strategy": "(remoe train evaluates once at the end)",
    "dataloader_drop_last": "(remoe train drops the last partial batch)",
}
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
        if name == "domains" and (not value or not all(isinstance(domain, str) for domain in value)):
            raise ValueError(f"{where}: data.domains must be a non-empty list of domain names, got {value!r}")


def check_training_section(training: dict[str, Any], where: str) -> None:
    """Keys, types, ranges and enumerated values against `TrainingArguments`' fields (no instance is built: under a
    launcher that would already set up the distributed state)."""
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
            raise ValueError(f"{where}: training.{name} must be {hints[name]}, got {_type_name(value)}")
        choices = _enum_values(hints[name])
        if choices and isinstance(value, str) and value not in choices:
            raise ValueError(
                f"{where}: training.{name} must be one of {sorted(choices)}, got {value!r}"
                f"{_did_you_mean(value, choices)}"
            )
    for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_total_limit"):
        value = training.get(name)
        if value is not None and value < 1:
            raise ValueError(f"{where}: training.{name} must be >= 1, got {value}")
    for name in ("learning_rate", "logging_steps", "save_steps"):
        value = training.get(name)
        if value is not None and not value > 0:
            raise ValueError(f"{where}: training.{name} must be > 0, got {value}")


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
        training = {
            name: value for name, value in self.sections["training"].items() if name not in ("seed", *WARMUP_FIELDS)
        }
        # Without an accelerator, the Trainer must be told: with DeepSpeed it would otherwise set up one process per rank.
        training.setdefault("use_cpu", trains_on_cpu(training))
        training.setdefault("dataloader_pin_memory", has_accelerator())
        return TrainingArguments(
            output_dir=str(self.output_dir),
            seed=self.seed,
            data_seed=self.seed,
            report_to=["tensorboard"],
            save_strategy="steps",
            eval_strategy="no",
            dataloader_drop_last=True,
            deepspeed=self.deepspeed,
            **training,
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
    for section, names in (("model", MODEL_FLAGS), ("data", DATA_FLAGS), ("training", TRAINING_FLAGS + WARMUP_FIELDS)):
        run[section].update({name: options[name] for name in names if options.get(name) is not None})
    for name, value in DATA_DEFAULTS.items():
        run["data"].setdefault(name, value)
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
    overrides = {name: run["model"][name] for name in CONTINUATION_FLAGS if name in run["model"]}
    overrides.update({name: options[name] for name in CONTINUATION_FLAGS if options.get(name) is not None})
    try:
        for name, value in overrides.items():
            setattr(config, name, value)
        config._check_values()
    except (TypeError, ValueError, StrictDataclassFieldValidationError) as error:
        raise ValueError(f"{where}: {' '.join(str(error).split())}") from error
    run["model"] = {**overrides, "router_type": config.router_type}
    return config


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
