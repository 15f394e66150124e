"""`remoe train`: pretrain a ReMoE / TopK / dense model with `transformers.Trainer` from a preset and overrides."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, TrainingArguments, set_seed

from remoe import ReMoEConfig, ReMoEForCausalLM
from remoe.checkpoints import load_model, load_tokenizer

from .controller import add_controller_callback
from .data import HUB_ID, collate_blocks, load_or_train_tokenizer, load_text_dataset, packed_splits
from .distributed import resolve_parallel_options, streaming_packed_splits, world_size_from_env
from .plots import plot_training_curves
from .routing import parameter_counts, routing_sparsity
from .run_config import check_memory, check_output_dir, claim_output_dir, has_accelerator, resolve_run
from .trainer import build_trainer, last_complete_checkpoint, remove_incomplete_checkpoints

_DISK_NEARLY_FULL_BYTES = 1 << 20


def _select_domains(corpus, domains: list[str] | None):
    """Keep only the rows of `domains` (every split), with a clear error for a domain the data does not have."""
    if not domains:
        return corpus
    available = sorted(set(corpus["train"]["domain"]))
    unknown = sorted(set(domains) - set(available))
    if unknown:
        raise ValueError(f"--domains {unknown} not in the dataset; available: {available}")
    return corpus.filter(lambda row: row["domain"] in domains)


def load_tokenizer_source(source: str):
    """`--tokenizer`: a local tokenizer folder (checked) or a Hub name, with a one-line error for either."""
    path = Path(source).expanduser()
    if path.exists():
        return load_tokenizer(path)
    if not HUB_ID.match(source):
        raise ValueError(f"--tokenizer {source!r}: no such folder, and not a Hugging Face Hub name")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--tokenizer {source!r}: not a local folder, and loading it from the Hub failed "
            f"({str(error).splitlines()[0]})"
        ) from error


def build_model(options: dict[str, Any], model_cfg: dict, tokenizer) -> ReMoEForCausalLM:
    """A fresh model from the preset, or the checkpoint of `--model_name_or_path` with controller overrides."""
    if options.get("model_name_or_path"):
        overrides = {key: value for key, value in model_cfg.items() if key != "router_type"}
        model = load_model(options["model_name_or_path"], **overrides)
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
    model_cfg, data_cfg = run["model"], run["data"]
    run["training"].setdefault("seed", 42)
    training_cfg = dict(run["training"])
    seed = training_cfg.pop("seed")
    if not options.get("model_name_or_path"):
        sharded = parallel["deepspeed"] is not None or parallel["expert_parallel_size"] > 1
        check_memory(ReMoEConfig(**model_cfg, vocab_size=data_cfg["vocab_size"]), world_size_from_env(), sharded)
    streaming = bool(options.get("streaming"))
    if streaming and (not (data_cfg.get("tokenizer") or options.get("model_name_or_path")) or data_cfg.get("domains")):
        raise ValueError("--streaming needs --tokenizer (or --model_name_or_path) and does not take --domains")
    run_name = Path(options["config"]).stem if options.get("config") else options.get("preset") or "tiny"
    output_dir = Path(options.get("output_dir") or f"outputs/{run_name}-{model_cfg['router_type']}")
    overwrite = bool(options.get("overwrite"))
    resume = check_output_dir(output_dir, run, resume=options.get("resume_from_checkpoint"), overwrite=overwrite)
    set_seed(seed)

    tokenizer = None
    if data_cfg.get("tokenizer"):
        tokenizer = load_tokenizer_source(data_cfg["tokenizer"])
    elif options.get("model_name_or_path"):
        tokenizer = load_tokenizer(options["model_name_or_path"])
    corpus = load_text_dataset(
        data_cfg["dataset"], text_column=data_cfg.get("text_column", "text"), seed=seed, streaming=streaming
    )
    corpus = _select_domains(corpus, data_cfg.get("domains"))
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(corpus, vocab_size=data_cfg["vocab_size"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if streaming:
        packed = streaming_packed_splits(corpus, tokenizer, data_cfg["block_size"], data_cfg["max_eval_blocks"], seed)
    else:
        packed = packed_splits(corpus, tokenizer, data_cfg["block_size"], num_proc=options.get("num_proc"))

    model = build_model(options, model_cfg, tokenizer)
    config = model.config
    claim_output_dir(output_dir, run, overwrite=overwrite)
    counts = parameter_counts(model)  # before expert parallelism leaves each rank a share of the experts
    # Without an accelerator, the Trainer must be told: with DeepSpeed it would otherwise set up one process per rank.
    training_cfg.setdefault("use_cpu", not has_accelerator())
    training_cfg.setdefault("dataloader_pin_memory", has_accelerator())
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
    with _explained_disk_full(output_dir):
        train_output = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - start
        trainer.save_model(str(output_dir))

    metrics = _final_metrics(trainer, model, packed["validation"], data_cfg)
    tokens = (train_output.global_step - controller.start_step) * _tokens_per_step(args, data_cfg)
    metrics.update(
        seed=seed,
        train_steps=train_output.global_step,
        train_loss=whole_run_train_loss(
            train_output.training_loss, train_output.global_step, controller.start_step, trainer.state.log_history
        ),
        train_seconds=round(train_seconds, 2),
        tokens_per_second=round(tokens / train_seconds, 1),
        **counts,
    )
    if trainer.is_world_process_zero():
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history) + "\n")
        plot_training_curves(trainer.state.log_history, config, output_dir / "training_curves.png")
        _print_summary(metrics, output_dir)
    return metrics


@contextlib.contextmanager
def _explained_disk_full(output_dir: Path):
    """A write that fails because the disk is full (torch reports it as an opaque stream error) becomes one OSError
    that says so; the unfinished checkpoint it leaves is removed, the complete ones stay."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(output_dir).free if output_dir.exists() else None
        if free is None or free > _DISK_NEARLY_FULL_BYTES:
            raise
        removed = remove_incomplete_checkpoints(output_dir) if int(os.environ.get("RANK", "0")) == 0 else []
        kept = last_complete_checkpoint(output_dir)
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing to {output_dir} ({free} bytes free"
            + (f"; removed the unfinished {', '.join(removed)}" if removed else "")
            + (f"; {kept} is complete: free some space and resume from it)" if kept else ")"),
        ) from error


def whole_run_train_loss(training_loss: float, global_step: int, start_step: int, log_history: list[dict]) -> float:
    """The mean training loss over every step of the run. After a resume the Trainer's `training_loss` covers the
    resumed steps only; the steps before come from the restored log (interval means weighted by interval length)."""
    if start_step == 0 or global_step <= start_step:
        return training_loss
    previous, total = 0, 0.0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= start_step:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    if previous == 0:
        return training_loss
    before = total / previous
    return (before * start_step + training_loss * (global_step - start_step)) / global_step


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


def run(args) -> None:
    """`remoe train`: the parsed command line as `train()` options."""
    if not has_accelerator():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own CPU detection warns on every start
    options = {key: value for key, value in vars(args).items() if key not in ("command", "handler")}
    train(options)
