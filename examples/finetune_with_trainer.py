"""Fine-tune a saved ReMoE checkpoint on instruction data with `transformers.Trainer` in your own script.

What a ReMoE model needs on top of any causal-LM fine-tuning script is one line: `add_controller_callback(trainer)`,
which updates the L1 coefficient lambda once per optimizer step from the routing sparsity (reduced over all ranks)
and logs `remoe/*` metrics. The loss the model returns already contains the L1 term; lambda is model state
(`controller.l1_coef`), saved with every checkpoint and restored on resume.

With `--lora`, `peft` adds LoRA adapters to the attention projections (`target_modules`) and to the expert weights,
which are 3D `nn.Parameter`s (E, 2I, H) and (E, H, I) rather than `nn.Linear`s and are therefore targeted with
`target_parameters` (peft >= 0.17; one rank-r adapter per expert). The small router (E x H) is trained in full
(`modules_to_save`) so that routing can adapt to the new data. `--merge` also writes the merged model as a plain
ReMoE checkpoint.

Data: a JSON / JSONL file with `instruction`, optional `input`, and `output` fields (Alpaca style), or
`--data builtin` (generated arithmetic instructions, so the example runs anywhere, also on CPU at toy size).

    python examples/finetune_with_trainer.py --model_name_or_path outputs/tiny-relu --output_dir outputs/tiny-sft \\
        --lora --merge
    torchrun --nproc_per_node 8 examples/finetune_with_trainer.py --model_name_or_path ... --output_dir ... \\
        --deepspeed configuration/deepspeed/zero2.json --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

from remoe.checkpoints import load_model
from remoe.training import add_controller_callback

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def builtin_instructions(count: int = 256, seed: int = 0) -> list[dict]:
    """Arithmetic instructions with their answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        operation, answer = rng.choice([("Add", a + b), ("Subtract", a - b), ("Multiply", a * b)])
        preposition = "from" if operation == "Subtract" else ("by" if operation == "Multiply" else "to")
        first, second = (b, a) if operation == "Subtract" else (a, b)
        rows.append({"instruction": f"{operation} {first} {preposition} {second}.", "input": "", "output": str(answer)})
    return rows


def load_instructions(data: str) -> Dataset:
    if data == "builtin":
        return Dataset.from_list(builtin_instructions())
    if not Path(data).is_file():
        raise ValueError(f"--data {data!r}: no such file (expected JSON/JSONL with instruction/output fields)")
    dataset = load_dataset("json", data_files=data, split="train")
    missing = {"instruction", "output"} - set(dataset.column_names)
    if missing or len(dataset) == 0:
        raise ValueError(f"--data {data!r}: needs rows with instruction and output; missing {sorted(missing)}")
    return dataset


def tokenize(dataset: Dataset, tokenizer, max_length: int) -> Dataset:
    """Prompt + response + eos; the loss covers the response tokens only (the prompt's labels are -100)."""

    def encode(row: dict) -> dict:
        template = PROMPT_WITH_INPUT if row.get("input") else PROMPT
        prompt = tokenizer(template.format(**row), add_special_tokens=False)["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        labels = ([-100] * len(prompt) + response)[:max_length]
        return {"input_ids": ids, "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="Tokenizing")


class PadCollator:
    """Right-pads a batch: pad token for the inputs, -100 for the labels, 0 in the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)

        def pad(values, fill):
            return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values])

        return {
            "input_ids": pad([row["input_ids"] for row in rows], self.pad_token_id),
            "labels": pad([row["labels"] for row in rows], -100),
            "attention_mask": pad([[1] * len(row["input_ids"]) for row in rows], 0),
        }


def add_lora(model, rank: int, alpha: int):
    """LoRA on attention (`target_modules`) and on the 3D expert weights (`target_parameters`); full router."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # peft's parameter adapters (the experts) take no dropout
        target_modules=ATTENTION,
        target_parameters=EXPERTS,
        modules_to_save=["router"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@torch.no_grad()
def response_loss(model, dataset: Dataset, collator: PadCollator, batch_size: int = 16) -> float:
    """Mean loss over the response tokens of `dataset` (evaluation mode: no L1 term)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collator(dataset.select(range(start, min(start + batch_size, len(dataset))))).items()
        }
        count = (batch["labels"][:, 1:] != -100).sum().item()
        total += model(**batch).loss.item() * count
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="a ReMoE checkpoint (e.g. from `remoe train`)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data", default="builtin", help="JSON/JSONL with instruction/[input]/output, or builtin")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--save_steps", type=int, default=50)
    parser.add_argument("--lora", action="store_true", help="LoRA on attention and experts (peft) instead of full FT")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--merge", action="store_true", help="with --lora, also save the merged model to OUTPUT/merged")
    parser.add_argument("--deepspeed", help="a DeepSpeed JSON (e.g. configuration/deepspeed/zero2.json)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--use_cpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume_from_checkpoint", nargs="?", const=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = tokenize(load_instructions(args.data), tokenizer, args.max_length)
    collator = PadCollator(tokenizer.pad_token_id)

    model = load_model(args.model_name_or_path)  # safetensors only, config and weights checked together
    if args.lora:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    loss_before = response_loss(model, dataset, collator)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        deepspeed=args.deepspeed,
        seed=args.seed,
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    controller = add_controller_callback(trainer)  # the one ReMoE-specific line
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # the adapter (with --lora) or the full model
    tokenizer.save_pretrained(args.output_dir)

    results = {
        "loss_before": loss_before,
        "loss_after": response_loss(model, dataset, collator),
        "steps": trainer.state.global_step,
        "history": controller.history,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if args.lora and args.merge and trainer.is_world_process_zero():
        merged = model.merge_and_unload()
        merged.save_pretrained(Path(args.output_dir) / "merged")
        tokenizer.save_pretrained(Path(args.output_dir) / "merged")
    if trainer.is_world_process_zero():
        summary = {key: value for key, value in results.items() if key != "history"}
        summary["final_sparsity"] = controller.history[-1]["remoe/sparsity"] if controller.history else math.nan
        (Path(args.output_dir) / "finetune_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    main()
