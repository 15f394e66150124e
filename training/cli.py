"""The `remoe` command line."""

from __future__ import annotations

import argparse
import sys

from remoe.configuration import available_presets
from remoe.hub_cards.push import add_push_parser

from .analysis import add_analyze_parser
from .btx import add_btx_parser, add_convert_parser, add_upcycle_parser
from .compare import add_compare_parser
from .evaluation import add_eval_parser
from .generate import add_generate_parser


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a ReMoE / TopK / dense model (default: the tiny preset on the embedded corpus)",
        description="Train with transformers.Trainer. Flags override the preset or --config file.",
    )
    parser.add_argument("--config", help="YAML file with model/data/training sections (instead of --preset)")
    parser.add_argument("--preset", default="tiny", help=f"packaged preset: {', '.join(available_presets())}")
    parser.add_argument(
        "--output_dir", help="where checkpoints, metrics.json and plots go (default outputs/PRESET-ROUTER)"
    )
    parser.add_argument(
        "--model_name_or_path",
        help="continue from a ReMoE checkpoint (its architecture and tokenizer) instead of a preset",
    )
    parser.add_argument("--router_type", choices=("relu", "topk", "dense"))
    parser.add_argument("--num_experts", type=int, help="experts per MoE layer (E)")
    parser.add_argument("--num_experts_per_tok", type=int, help="k: TopK's experts per token, ReMoE's target k")
    parser.add_argument("--granularity", type=int, help="fine-grained experts G (E*G experts of size I/G)")
    parser.add_argument("--load_balance", choices=("refined_l1", "l1"))
    parser.add_argument("--l1_coef_init", type=float, help="lambda_0 of the controller")
    parser.add_argument("--l1_coef_multiplier", type=float, help="alpha of the controller (> 1)")
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--per_device_train_batch_size", type=int)
    parser.add_argument("--gradient_accumulation_steps", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--logging_steps", type=int)
    parser.add_argument("--save_steps", type=int)
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dataset", help="'builtin' (embedded corpus), a local file/folder, or a Hub dataset name")
    parser.add_argument("--domains", nargs="+", help="train and evaluate on these domains only (e.g. code math)")
    parser.add_argument("--freeze_experts", action="store_true", help="train everything but the expert FFNs")
    parser.add_argument("--text_column", help="text column of --dataset (default: text)")
    parser.add_argument("--tokenizer", help="a tokenizer folder or Hub name (default: BPE trained on the corpus)")
    parser.add_argument("--vocab_size", type=int, help="vocabulary of the trained tokenizer")
    parser.add_argument("--block_size", type=int, help="tokens per training sequence")
    parser.add_argument("--streaming", action="store_true", default=None, help="pack --dataset on the fly (no cache)")
    parser.add_argument("--num_proc", type=int, help="processes for tokenization")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (examples in remoe/configuration/deepspeed)")
    parser.add_argument(
        "--expert_parallel_size", type=int, help="shard each MoE layer's experts over N ranks (DeepSpeed ZeRO-1/2)"
    )
    parser.add_argument("--max_eval_blocks", type=int, help="validation blocks per domain for the final evaluation")
    parser.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const=True,
        help="a checkpoint folder, or no value for the latest checkpoint in --output_dir",
    )
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from .train import train

    options = vars(args).copy()
    options.pop("run")
    train(options)


# Each subcommand module exposes `add_<name>_parser(subparsers)`, which sets `run=callable(args)` as default.
SUBCOMMANDS = (
    add_train_parser,
    add_compare_parser,
    add_analyze_parser,
    add_eval_parser,
    add_generate_parser,
    add_push_parser,
    add_btx_parser,
    add_upcycle_parser,
    add_convert_parser,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remoe", description="ReLU-routed Mixture-of-Experts for Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"remoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
