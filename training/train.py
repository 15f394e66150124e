"""`remoe train`: pretrain a ReMoE / TopK / dense model with `transformers.Trainer` from a preset and overrides."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)

from remoe import ReMoEConfig, ReMoEForCausalLM
from remoe.configuration import load_preset

from .controller import add_controller_callback
from .data import collate_blocks, load_or_train_tokenizer, load_text_dataset, packed_splits
from .distributed import resolve_parallel_options, streaming_packed_splits
from .plots import plot_training_curves
from .routing import parameter_counts, routing_sparsity
from .trainer import build_trainer, check_complete_checkpoint, last_complete_checkpoint

# CLI flags that land in the model config; everything else that is not None goes to `data` or `training`.
MODEL_FLAGS = (
    "router_type",
    "num_experts",
    "num_experts_per_tok",
    "granularity",
    "l1_coef_init",
    "l1_coef_multiplier",
    "load_balance",
)
DATA_FLAGS = ("dataset", "domains", "tokenizer", "text_column", "block_size", "vocab_size", "max_eval_blocks")
# Model fields that may change when training continues from a checkpoint (`--model_name_or_path`).
CONTINUATION_FLAGS = ("l1_coef_init", "l1_coef_multiplier", "load_balance", "router_aux_loss_coef")
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


def resolve_run(options: dict[str, Any]) -> dict[str, dict]:
    """Merge the preset (or `--config` file) with the command-line overrides and check the result."""
    run = load_preset(options.get("config") or options.get("preset") or "tiny")
    for section, names in (("model", MODEL_FLAGS), ("data", DATA_FLAGS), ("training", TRAINING_FLAGS)):
        run[section].update({name: options[name] for name in names if options.get(name) is not None})
    run["data"].setdefault("dataset", "builtin")
    run["data"].setdefault("vocab_size", 8192)
    run["data"].setdefault("max_eval_blocks", 64)
    if run["data"].get("block_size", 0) < 2:
        raise ValueError(f"data.block_size must be >= 2, got {run['data'].get('block_size')}")
    if run["training"].get("max_steps", 0) < 1:
        raise ValueError(f"training.max_steps must be >= 1, got {run['training'].get('max_steps')}")
    _check_training_section(run["training"])
    if not (run["data"].get("tokenizer") or options.get("model_name_or_path")) and run["data"]["vocab_size"] < 258:
        raise ValueError(
            f"data.vocab_size must be >= 258 (256 bytes + 2 special tokens), got {run['data']['vocab_size']}"
        )
    resume = options.get("resume_from_checkpoint")
    if isinstance(resume, str):
        if not Path(resume).is_dir():
            raise ValueError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder")
        check_complete_checkpoint(resume)
    if options.get("model_name_or_path"):
        changed = [name for name in MODEL_FLAGS if options.get(name) is not None and name not in CONTINUATION_FLAGS]
        if changed:
            raise ValueError(
                f"--model_name_or_path keeps the checkpoint's architecture; {', '.join(changed)} cannot be changed "
                f"(allowed: {', '.join(CONTINUATION_FLAGS)})"
            )
        overrides = {name: options[name] for name in CONTINUATION_FLAGS if options.get(name) is not None}
        # Fails early on a bad folder or a bad override.
        config = ReMoEConfig.from_pretrained(options["model_name_or_path"], **overrides)
        run["model"] = {**overrides, "router_type": config.router_type}
    else:
        ReMoEConfig(**run["model"])  # validates the model section before any data work
    return run


POSITIVE_INTEGER_FIELDS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
)


def _check_training_section(training: dict[str, Any]) -> None:
    """The values `TrainingArguments` would only reject (or misuse) after the data work, checked up front."""
    for name in POSITIVE_INTEGER_FIELDS:
        value = training.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"training.{name} must be an integer >= 1, got {value!r}")
    learning_rate = training.get("learning_rate")
    if learning_rate is not None and not (isinstance(learning_rate, int | float) and learning_rate > 0):
        raise ValueError(f"training.learning_rate must be > 0, got {learning_rate!r}")


def _select_domains(corpus, domains: list[str] | None):
    """Keep only the rows of `domains` (every split), with a clear error for a domain the data does not have."""
    if not domains:
        return corpus
    available = sorted(set(corpus["train"]["domain"]))
    unknown = sorted(set(domains) - set(available))
    if unknown:
        raise ValueError(f"--domains {unknown} not in the dataset; available: {available}")
    return corpus.filter(lambda row: row["domain"] in domains)


def build_model(options: dict[str, Any], model_cfg: dict, tokenizer) -> ReMoEForCausalLM:
    """A fresh model from the preset, or the checkpoint of `--model_name_or_path` with controller overrides."""
    if options.get("model_name_or_path"):
        overrides = {key: value for key, value in model_cfg.items() if key != "router_type"}
        model = ReMoEForCausalLM.from_pretrained(options["model_name_or_path"], **overrides)
        if "l1_coef_init" in overrides and model.controller is not None:
            model.controller.l1_coef.fill_(overrides["l1_coef_init"])  # the checkpoint's lambda would win otherwise
    else:
        config = ReMoEConfig(
            **model_cfg,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = ReMoEForCausalLM(config)
    if options.get("freeze_experts"):
        for name, parameter in model.named_parameters():
            if ".mlp.experts." in name:
                parameter.requires_grad_(False)
    return model


def _eval_sets(validation, max_blocks: int) -> dict:
    """The validation blocks as a whole and per domain, each capped at `max_blocks` blocks."""
    sets = {"all": validation.shuffle(seed=0).select(range(min(max_blocks, len(validation))))}
    for domain in sorted(set(validation["domain"])):
        subset = validation.filter(lambda row, d=domain: row["domain"] == d)
        sets[domain] = subset.select(range(min(max_blocks, len(subset))))
    return sets


def train(options: dict[str, Any]) -> dict[str, Any]:
    """Run one training job and return the metrics written to `metrics.json`."""
    run = resolve_run(options)
    parallel = resolve_parallel_options(options, run)  # DeepSpeed config and expert-parallel layout, checked here
    model_cfg, data_cfg, training_cfg = run["model"], run["data"], dict(run["training"])
    seed = int(training_cfg.pop("seed", options.get("seed") or 42))
    output_dir = Path(
        options.get("output_dir") or f"outputs/{options.get('preset') or 'tiny'}-{model_cfg['router_type']}"
    )
    set_seed(seed)

    if options.get("resume_from_checkpoint") is True and last_complete_checkpoint(output_dir) is None:
        raise ValueError(f"--resume_from_checkpoint: no complete checkpoint-N in {output_dir} to resume from")
    streaming = bool(options.get("streaming"))
    tokenizer_source = data_cfg.get("tokenizer") or options.get("model_name_or_path")
    if streaming and (not tokenizer_source or data_cfg.get("domains")):
        raise ValueError("--streaming needs --tokenizer (or --model_name_or_path) and does not take --domains")
    corpus = load_text_dataset(
        data_cfg["dataset"], text_column=data_cfg.get("text_column", "text"), seed=seed, streaming=streaming
    )
    corpus = _select_domains(corpus, data_cfg.get("domains"))
    if tokenizer_source:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    else:
        tokenizer = load_or_train_tokenizer(corpus, vocab_size=data_cfg["vocab_size"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if streaming:
        packed = streaming_packed_splits(corpus, tokenizer, data_cfg["block_size"], data_cfg["max_eval_blocks"], seed)
    else:
        packed = packed_splits(corpus, tokenizer, data_cfg["block_size"], num_proc=options.get("num_proc"))

    model = build_model(options, model_cfg, tokenizer)
    config = model.config
    counts = parameter_counts(model)  # before expert parallelism leaves each rank a share of the experts
    # Without an accelerator, the Trainer must be told: with DeepSpeed it would otherwise set up one process per rank.
    training_cfg.setdefault("use_cpu", not _has_accelerator())
    args = TrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        report_to=["tensorboard"],
        save_strategy="steps",
        eval_strategy="no",
        dataloader_drop_last=True,
        deepspeed=parallel["deepspeed"],
        **training_cfg,
    )
    trainer = build_trainer(
        model,
        args,
        expert_parallel_size=parallel["expert_parallel_size"],
        train_dataset=packed["train"],
        data_collator=collate_blocks,
        processing_class=tokenizer,
    )
    controller = add_controller_callback(trainer)

    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=options.get("resume_from_checkpoint"))
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(output_dir))

    metrics = _final_metrics(trainer, model, packed["validation"], data_cfg)
    tokens = (train_output.global_step - controller.start_step) * _tokens_per_step(args, data_cfg)
    metrics.update(
        seed=seed,
        train_steps=train_output.global_step,
        train_loss=train_output.training_loss,
        train_seconds=round(train_seconds, 2),
        tokens_per_second=round(tokens / train_seconds, 1),
        **counts,
    )
    if trainer.is_world_process_zero():
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history) + "\n")
        (output_dir / "run_config.yaml").write_text(
            yaml.safe_dump({**run, "training": {**run["training"], "seed": seed}})
        )
        plot_training_curves(trainer.state.log_history, config, output_dir / "training_curves.png")
        _print_summary(metrics, output_dir)
    return metrics


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _tokens_per_step(args: TrainingArguments, data_cfg: dict) -> int:
    return (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * data_cfg["block_size"]
    )


def _final_metrics(trainer, model, validation, data_cfg: dict) -> dict[str, Any]:
    config = model.config
    eval_sets = _eval_sets(validation, data_cfg["max_eval_blocks"])
    trainer.args.dataloader_drop_last = False  # training keeps whole batches; evaluation sees every block
    results = trainer.evaluate(eval_dataset=eval_sets)
    metrics: dict[str, Any] = {"router_type": config.router_type}
    for name in eval_sets:
        loss = results[f"eval_{name}_loss"]
        key = "validation" if name == "all" else f"validation_{name}"
        metrics[f"{key}_loss"] = loss
        metrics[f"{key}_perplexity"] = math.exp(loss)
    if config.router_type != "dense":
        batch_size = trainer.args.per_device_eval_batch_size
        metrics.update(routing_sparsity(model, eval_sets["all"]["input_ids"], batch_size=batch_size))
        # The Trainer's log history (restored on resume) holds the controller's interval averages.
        history = [entry for entry in trainer.state.log_history if "remoe/sparsity" in entry]
        tail = history[-max(1, len(history) // 10) :]
        if tail:
            metrics["train_sparsity_final"] = sum(h["remoe/sparsity"] for h in tail) / len(tail)
        metrics["target_sparsity"] = config.target_sparsity if config.router_type == "relu" else None
    if config.router_type == "relu":
        metrics["l1_coef"] = model.l1_coef
    return metrics


def _print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    width = max(len(key) for key in metrics)
    print(f"\nremoe train finished: checkpoint, metrics.json and training_curves.png in {output_dir}")
    for key, value in metrics.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")
