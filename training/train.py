"""`remoe train`: pretrain a ReMoE / TopK / dense model with `transformers.Trainer` from a preset and overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from remoe import ReMoEForCausalLM
from remoe.checkpoints import load_model
from remoe.records import TrainingMetrics, parameter_counts

from . import allocator
from .controller import TopKWarmupCallback, add_controller_callback
from .data import collate_blocks, prepare_data
from .distributed import world_size_from_env
from .plots import plot_training_curves
from .routing import routing_sparsity
from .run_config import RunConfig, claim_output_dir, has_accelerator, plan_run
from .trainer import build_trainer, last_complete_checkpoint, remove_incomplete_checkpoints

_DISK_NEARLY_FULL_BYTES = 1 << 20


def build_model(run: RunConfig, tokenizer) -> ReMoEForCausalLM:
    """A fresh model of the run's config (its vocabulary and special tokens completed from the tokenizer), or the
    checkpoint of `--model_name_or_path` with the controller overrides."""
    if run.model_name_or_path:
        overrides = {key: value for key, value in run.sections["model"].items() if key != "router_type"}
        # fp32 master weights whatever the checkpoint's dtype (a bf16 checkpoint would otherwise train in bf16);
        # `--bf16` then computes in bf16 under autocast, as for a new model.
        dtype = "auto" if run.model_dtype == "auto" else getattr(torch, run.model_dtype)
        model = load_model(run.model_name_or_path, dtype=dtype, **overrides)
        if "l1_coef_init" in overrides and model.controller is not None:
            model.controller.l1_coef.fill_(overrides["l1_coef_init"])  # the checkpoint's lambda would win otherwise
    else:
        config = run.model_config
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model = ReMoEForCausalLM(config)
    if run.freeze_experts:
        for name, parameter in model.named_parameters():
            if ".mlp.experts." in name:
                parameter.requires_grad_(False)
    return model


class NonFiniteLossCallback(TrainerCallback):
    """Stops the run at the first NaN/inf training loss in the log, without saving that step's checkpoint.

    remoe turns the Trainer's `logging_nan_inf_filter` off by default (`run_config.TRAINING_DEFAULTS`), so a
    non-finite step reaches the logged interval mean instead of being replaced; `train` then raises."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss: float | None = None
        self.last_finite_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_finite_step = state.global_step  # a resumed run starts from its checkpoint's step

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "train_loss"):
            value = (logs or {}).get(key)
            if self.step is not None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                self.step, self.loss = state.global_step, value
            elif key == "loss":
                self.last_finite_step = state.global_step
        if self.step is not None:
            control.should_training_stop = True
            control.should_save = False
        return control


def check_training_loss(
    callback: NonFiniteLossCallback, training_loss: float, global_step: int, learning_rate: float
) -> None:
    """A run whose training loss became NaN/inf is an error (its weights are not finite any more), not a success."""
    if callback.step is None and math.isfinite(training_loss):
        return
    step = callback.step if callback.step is not None else global_step
    loss = callback.loss if callback.loss is not None else training_loss
    raise ValueError(
        f"the training loss became {loss} by step {step} (finite up to the log at step {callback.last_finite_step}): "
        f"the run diverged and its final model was not saved; lower training.learning_rate (now {learning_rate}), "
        "or clip the gradients with training.max_grad_norm (e.g. 1.0), and start again with --overwrite "
        f"(checkpoints after step {callback.last_finite_step} may hold non-finite weights)"
    )


def check_enough_blocks(run: RunConfig, blocks: int) -> None:
    """One optimizer step takes per_device_train_batch_size x processes x gradient_accumulation_steps blocks; with
    fewer training blocks (the last partial batch is dropped) the run would train 0 steps, or every step on a
    smaller batch than asked, and still report success."""
    training = run.sections["training"]
    defaults = {field.name: field.default for field in dataclasses.fields(TrainingArguments)}
    batch = training.get("per_device_train_batch_size", defaults["per_device_train_batch_size"])
    accumulation = training.get("gradient_accumulation_steps", defaults["gradient_accumulation_steps"])
    processes = world_size_from_env()
    if batch * processes * accumulation <= blocks:
        return
    factors = [f"per_device_train_batch_size ({batch})"]
    if processes > 1:
        factors.append(f"{processes} processes")
    if accumulation > 1:
        factors.append(f"gradient_accumulation_steps ({accumulation})")
    needed = f" = {batch * processes * accumulation} blocks per optimizer step" if len(factors) > 1 else ""
    largest = blocks // (processes * accumulation)
    advice = (
        f"use per_device_train_batch_size {largest} at most"
        if largest >= 1
        else "lower gradient_accumulation_steps or the number of processes"
    )
    raise ValueError(
        f"{' x '.join(factors)}{needed} exceeds the {blocks} training blocks of "
        f"{run.data['block_size']} tokens: {advice}, or train on more data (or a smaller data.block_size)"
    )


def _eval_sets(validation, max_blocks: int) -> dict:
    """The validation blocks as a whole and per domain, each capped at `max_blocks` blocks."""
    sets = {"all": validation.shuffle(seed=0).select(range(min(max_blocks, len(validation))))}
    for domain in sorted(set(validation["domain"])):
        subset = validation.filter(lambda row, d=domain: row["domain"] == d)
        sets[domain] = subset.select(range(min(max_blocks, len(subset))))
    return sets


def train(options: dict[str, Any]) -> dict[str, Any]:
    """Run one training job and return the metrics written to `metrics.json`.

    The stages, in order: the run configuration (every check, `run_config`), the data (`data`), the model, the
    Trainer with the controller and its checkpoints (`trainer`, `controller`), then the final metrics and plots.
    Before all of them, glibc is told to keep freed memory (`allocator.keep_freed_memory`; `REMOE_KEEP_FREED_MEMORY=0`
    turns it off)."""
    allocator.keep_freed_memory()
    run = plan_run(options)
    set_seed(run.seed)
    data = prepare_data(
        run.data,
        seed=run.seed,
        model_name_or_path=run.model_name_or_path,
        streaming=run.streaming,
        num_proc=run.num_proc,
    )
    if not run.streaming:  # a stream has no length to check
        check_enough_blocks(run, len(data.train))
    model = build_model(run, data.tokenizer)
    config = model.config
    args = run.training_arguments()
    claim_output_dir(run)
    counts = parameter_counts(model)  # before expert parallelism leaves each rank a share of the experts
    trainer = build_trainer(
        model,
        args,
        expert_parallel_size=run.expert_parallel_size,
        train_dataset=data.train,
        data_collator=collate_blocks,
        processing_class=data.tokenizer,
    )
    controller = add_controller_callback(trainer)
    if run.topk_warmup is not None:
        trainer.add_callback(TopKWarmupCallback(*run.topk_warmup))
    loss_check = NonFiniteLossCallback()
    trainer.add_callback(loss_check)

    output_dir = run.output_dir
    start = time.perf_counter()
    with _explained_disk_full(output_dir):
        train_output = trainer.train(resume_from_checkpoint=run.resume_from_checkpoint)
        train_seconds = time.perf_counter() - start
        check_training_loss(loss_check, train_output.training_loss, train_output.global_step, args.learning_rate)
        trainer.save_model(str(output_dir))

    metrics = _final_metrics(trainer, model, data.validation, run.data)
    tokens = (train_output.global_step - controller.start_step) * _tokens_per_step(args, run.data)
    metrics.update(
        seed=run.seed,
        train_steps=train_output.global_step,
        train_loss=whole_run_train_loss(
            train_output.training_loss, train_output.global_step, controller.start_step, trainer.state.log_history
        ),
        train_seconds=round(train_seconds, 2),
        tokens_per_second=round(tokens / train_seconds, 1),
        **counts,
    )
    if trainer.is_world_process_zero():
        TrainingMetrics.from_dict(metrics, strict=True).write(output_dir)
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
    """The mean training loss over every step of the run, also after a resume.

    After a resume the Trainer's `training_loss` sums the resumed steps only, and Transformers releases divide that sum
    differently (by the resumed steps, or before 5.2x by all steps). The restored log holds every interval's mean, so
    when it reaches the last step the whole-run mean comes from it alone (interval means weighted by interval length);
    otherwise the steps before the resume come from the log and the resumed ones from `training_loss`."""
    if start_step == 0 or global_step <= start_step:
        return training_loss
    intervals, previous = [], 0
    for entry in log_history:
        if "loss" in entry and entry["step"] > previous:
            intervals.append((entry["step"] - previous, entry["loss"], entry["step"]))
            previous = entry["step"]
    if previous == global_step:
        return sum(length * loss for length, loss, _ in intervals) / global_step
    before = [(length, loss) for length, loss, step in intervals if step <= start_step]
    logged_before = sum(length for length, _ in before)
    if logged_before == 0:
        return training_loss
    mean_before = sum(length * loss for length, loss in before) / logged_before
    return (mean_before * start_step + training_loss * (global_step - start_step)) / global_step


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
    if config.has_experts:
        batch_size = trainer.args.per_device_eval_batch_size
        metrics.update(routing_sparsity(model, eval_sets["all"]["input_ids"], batch_size=batch_size))
        # The Trainer's log history (restored on resume) holds the controller's interval averages.
        history = [entry for entry in trainer.state.log_history if "remoe/sparsity" in entry]
        tail = history[-max(1, len(history) // 10) :]
        if tail:
            metrics["train_sparsity_final"] = sum(h["remoe/sparsity"] for h in tail) / len(tail)
        metrics["target_sparsity"] = config.target_sparsity if config.uses_l1_controller else None
    if config.uses_l1_controller:
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
