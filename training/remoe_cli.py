"""The `remoe` command line: every subcommand's arguments, parsed without importing torch or the model.

Installed as the top-level module `remoe_cli` (the `remoe` console script) because importing anything inside the
`remoe` package imports the model and registers it with Transformers, which takes seconds; `remoe --help` and
argument errors take a fraction of one. Each subcommand names its implementation as `"module:function"`, imported
only when the command runs. `python -m remoe.training.cli` is the same command line (used under `torchrun`).

Errors raised as `ValueError` (bad input: every check names the flag, field or file) or `OSError` (the file system)
end the command with one line and exit status 2; `REMOE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# Vocabularies of the choices below. They are the project's own (configuration_remoe.ROUTER_TYPES, conversion,
# generate.DTYPES); tests/test_cli.py checks that the copies here agree with them.
ROUTER_TYPES = ("relu", "topk", "dense", "hash", "expert_choice", "sparsemixer", "lory")
LOAD_BALANCE_TYPES = ("refined_l1", "l1")
AUX_LOSS_REDUCTIONS = ("sum", "mean")
MIX_ROUTER_TYPES = ("relu", "topk")
SHARED_MODES = ("average", "base")
ROUTER_INITS = ("random", "centroid")
UPCYCLE_MODES = ("copy", "split")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRESETS = ("tiny", "182m", "469m", "978m")


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _integer_at_least(1)
non_negative_int = _integer_at_least(0)


def _finite_number(text: str, minimum: float | None = None, *, strict: bool = False) -> float:
    """`text` as a finite float (no inf / nan), `> minimum` with `strict`, else `>= minimum` (None: any)."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
    too_small = minimum is not None and (value <= minimum if strict else value < minimum)
    if not math.isfinite(value) or too_small:
        raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {value}")
    return value


def _finite_float(text: str) -> float:
    return _finite_number(text)


def _non_negative_float(text: str) -> float:
    return _finite_number(text, 0.0)


def _positive_float(text: str) -> float:
    return _finite_number(text, 0.0, strict=True)


def _finite_positive_float(text: str) -> float:
    return _finite_number(text, 0.0, strict=True)


def _float_above_one(text: str) -> float:
    return _finite_number(text, 1.0, strict=True)


# The knobs of the ReMoE paper's other baselines: config field -> the router type it applies to (the same table as
# remoe.training.run_config.ROUTER_SPECIFIC_FLAGS; tests/test_routers_cli.py checks they agree).
ROUTER_SPECIFIC_FLAGS = {
    "router_hash_seed": "hash",
    "router_capacity_factor": "expert_choice",
    "router_jitter_eps": "sparsemixer",
    "router_segment_length": "lory",
}


def _add_baseline_router_flags(parser) -> None:
    """--router_hash_seed, --router_capacity_factor, --router_jitter_eps, --router_segment_length; None when not
    given (the config's defaults then apply)."""
    parser.add_argument(
        "--router_hash_seed",
        type=non_negative_int,
        help="hash: seed of the random token-id -> experts table (default 0)",
    )
    parser.add_argument(
        "--router_capacity_factor",
        type=_finite_positive_float,
        help="expert_choice: each expert takes C = ceil(factor * k * G * T / (E * G)) of a batch's T tokens "
        "(default 1.0)",
    )
    parser.add_argument(
        "--router_jitter_eps",
        type=_finite_positive_float,
        help="sparsemixer: experts more than 2 * eps (relative) below the best are masked before sampling "
        "(default 0.01)",
    )
    parser.add_argument(
        "--router_segment_length",
        type=positive_int,
        help="lory: tokens per segment (default 256, at most max_position_embeddings // 4); must be smaller than "
        "the block size",
    )


def _add_run_source(parser) -> None:
    parser.add_argument("--config", help="YAML file with model/data/training sections (instead of --preset)")
    parser.add_argument("--preset", help=f"packaged preset: {', '.join(PRESETS)} (default: tiny)")


def _add_controller_flags(group) -> None:
    group.add_argument("--l1_coef_init", type=_non_negative_float, help="lambda_0 of the L1 controller (ReLU)")
    group.add_argument("--l1_coef_multiplier", type=_float_above_one, help="alpha of the L1 controller (ReLU, > 1)")
    group.add_argument("--load_balance", choices=LOAD_BALANCE_TYPES)
    group.add_argument(
        "--router_aux_loss_coef", type=_non_negative_float, help="weight of the Switch balancing loss (TopK)"
    )


def _add_training_flags(group) -> None:
    group.add_argument("--max_steps", type=positive_int)
    group.add_argument("--per_device_train_batch_size", type=positive_int)
    group.add_argument("--gradient_accumulation_steps", type=positive_int)
    group.add_argument("--learning_rate", type=_positive_float)
    group.add_argument("--logging_steps", type=positive_int)
    group.add_argument("--save_steps", type=positive_int)
    group.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    group.add_argument("--seed", type=non_negative_int)
    group.add_argument("--text_column", help="text column of the dataset (default: text)")
    group.add_argument("--block_size", type=_integer_at_least(2), help="tokens per training sequence")
    group.add_argument("--max_eval_blocks", type=positive_int, help="validation blocks per domain at the end")


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a ReMoE / TopK / dense model (default: the tiny preset on the embedded corpus)",
        description="Train with transformers.Trainer. Flags override the preset or --config file.",
    )
    _add_run_source(parser)
    parser.add_argument(
        "--output_dir",
        help="where checkpoints, metrics.json and plots go (default outputs/PRESET-ROUTER or CONFIG-ROUTER)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier run left in --output_dir")
    parser.add_argument(
        "--model_name_or_path", help="continue from a ReMoE checkpoint (its architecture and tokenizer)"
    )
    parser.add_argument("--router_type", choices=ROUTER_TYPES)
    parser.add_argument("--num_experts", type=positive_int, help="experts per MoE layer (E)")
    parser.add_argument("--num_experts_per_tok", type=positive_int, help="k: TopK's experts per token, ReMoE's target")
    parser.add_argument("--granularity", type=positive_int, help="fine-grained experts G (E*G experts of size I/G)")
    _add_controller_flags(parser)
    parser.add_argument(
        "--router_aux_loss_reduction",
        choices=AUX_LOSS_REDUCTIONS,
        help="TopK: the balancing loss summed over the MoE layers (default, as Megatron) or averaged",
    )
    _add_topk_routing_flags(parser, "off", "off")
    _add_baseline_router_flags(parser)
    _add_training_flags(parser)
    parser.add_argument("--dataset", help="'builtin' (embedded corpus), a local file/folder, or a Hub dataset name")
    parser.add_argument("--domains", nargs="+", help="train and evaluate on these domains only (e.g. code math)")
    parser.add_argument("--freeze_experts", action="store_true", help="train everything but the expert FFNs")
    parser.add_argument(
        "--topk_warmup_k", type=positive_int, help="TopK: experts per token during a near-dense warmup (e.g. 6)"
    )
    parser.add_argument("--topk_warmup_steps", type=positive_int, help="TopK: optimizer steps of that warmup")
    parser.add_argument(
        "--model_dtype",
        choices=DTYPES,
        help="with --model_name_or_path: the dtype of the trained weights (default float32: fp32 master weights, "
        "also from a bf16 checkpoint; auto: the checkpoint's)",
    )
    parser.add_argument("--tokenizer", help="a tokenizer folder or Hub name (default: BPE trained on the corpus)")
    parser.add_argument("--vocab_size", type=_integer_at_least(258), help="vocabulary of the trained tokenizer")
    parser.add_argument("--streaming", action="store_true", default=None, help="pack --dataset on the fly (no cache)")
    parser.add_argument("--num_proc", type=positive_int, help="processes for tokenization")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (examples in remoe/configuration/deepspeed)")
    parser.add_argument(
        "--expert_parallel_size", type=positive_int, help="shard each MoE layer's experts over N ranks (DeepSpeed)"
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const=True,
        help="a checkpoint folder, or no value for the latest complete checkpoint in --output_dir",
    )
    parser.set_defaults(handler="remoe.training.train:run")


def add_compare_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="train dense / TopK / ReMoE with equal active parameters over several seeds and tabulate"
    )
    _add_run_source(parser)
    parser.add_argument("--router_types", nargs="+", choices=ROUTER_TYPES, default=["dense", "topk", "relu"])
    parser.add_argument("--num_experts", nargs="+", type=positive_int, default=[8], help="several: the scaling curve")
    parser.add_argument(
        "--granularities", nargs="+", type=positive_int, default=[1], help="several: the granularity curve (G)"
    )
    parser.add_argument("--num_experts_per_tok", type=positive_int)
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=positive_int)
    group = parser.add_argument_group(
        "router knobs (each passed only to the runs of the router it applies to, so the other runs are reused)"
    )
    _add_baseline_router_flags(group)
    parser.add_argument(
        "--eval_tasks",
        nargs="+",
        metavar="TASK",
        help="lm-eval tasks run on every finished run's model (e.g. remoe_arith remoe_ppl_code remoe_ppl_docs, or the "
        "tag remoe); results cached in each run folder (compare_eval_results.json), mean ± std in compare.json/.md",
    )
    parser.add_argument(
        "--eval_limit", type=positive_int, help="with --eval_tasks: only the first N documents per task"
    )
    parser.add_argument("--eval_batch_size", type=positive_int, default=8, help="with --eval_tasks (default 8)")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.set_defaults(handler="remoe.training.compare:run")


def add_analyze_parser(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="routing analysis of a checkpoint on held-out text (PNG + JSON)")
    parser.add_argument("model_dir")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dataset", default="builtin", help="'builtin', a local file/folder, or a Hub dataset")
    parser.add_argument("--max_blocks_per_domain", type=positive_int, default=32)
    parser.add_argument("--block_size", type=_integer_at_least(2), help="default: the model's context, at most 512")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument(
        "--compare_to",
        metavar="CHECKPOINT_DIR",
        help="a checkpoint of the same architecture: the flip rate of the routing decisions between the two",
    )
    parser.add_argument(
        "--top_tokens_layer",
        type=non_negative_int,
        help="MoE layer whose experts' 10 most frequent tokens are listed (default: the middle MoE layer)",
    )
    parser.set_defaults(handler="remoe.training.analysis:run")


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint with lm-evaluation-harness (local tasks from the embedded corpus by default)",
        description=(
            "Runs lm_eval.simple_evaluate with lm-eval's `hf` model. Local tasks: remoe_arith, remoe_ppl_code, "
            "remoe_ppl_docs (tags: remoe, remoe_ppl); standard lm-eval task names work when their data is reachable. "
            "Per-domain token perplexity and routing sparsity of the evaluated text are reported alongside."
        ),
    )
    parser.add_argument("model_dir", help="checkpoint folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--tasks", default="remoe", help="comma-separated task/group/tag names (default: remoe)")
    parser.add_argument(
        "--output_path", help="results JSON, or a folder for eval_results.json (default: MODEL_DIR/eval_results.json)"
    )
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N documents of each task")
    parser.add_argument("--num_fewshot", type=non_negative_int)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--max_length", type=positive_int, help="context length (default: max_position_embeddings)")
    parser.add_argument("--experts_implementation", help="eager, batched_mm, grouped_mm, triton, ...")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="load through the checkpoint's remote code (auto_map)"
    )
    parser.add_argument("--include_path", action="append", default=[], help="extra lm-eval task folder (repeatable)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.set_defaults(handler="remoe.training.evaluation:run")


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="complete prompts with a checkpoint (model.generate)")
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    parser.add_argument(
        "--max_new_tokens",
        type=positive_int,
        help="tokens to generate (default 64, or what the model's max_position_embeddings leaves after the prompt); "
        "the prompt and these tokens must fit max_position_embeddings",
    )
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature", type=_finite_float, default=1.0, help="sampling temperature (needs --do_sample)"
    )
    parser.add_argument("--top_p", type=_finite_float, default=1.0, help="nucleus sampling (needs --do_sample)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--experts_implementation", help="eager, batched_mm, grouped_mm, triton, ...")
    parser.add_argument(
        "--show_routing", action="store_true", help="print how many experts each new token used in each layer"
    )
    parser.add_argument(
        "--chat", action="store_true", help="send each prompt as a user turn through the tokenizer's chat template"
    )
    parser.add_argument("--system", help="system message before each prompt (needs --chat)")
    parser.add_argument("--stream", action="store_true", help="print the tokens as they are generated")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler="remoe.training.generate:run")


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="share a checkpoint on the Hugging Face Hub (safetensors, remote code, tokenizer, model card)",
        description=(
            "Prepares the repository folder (sharded safetensors, config.json with auto_map, remote-code files, "
            "tokenizer, generation_config.json, metrics, plots, README.md model card) and uploads it with "
            "huggingface_hub (create_repo(exist_ok=True) + upload_folder). The token comes from --token, HF_TOKEN or "
            "`hf auth login`; HF_ENDPOINT selects the Hub."
        ),
    )
    parser.add_argument("model_dir", help="checkpoint folder written by `remoe train` (or save_pretrained)")
    parser.add_argument("--repo_id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry_run", metavar="OUT", help="only write the repository folder to OUT; upload nothing")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--license", default="apache-2.0", help="license in the card metadata (default: apache-2.0)")
    parser.add_argument("--max_shard_size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--commit_message")
    parser.add_argument(
        "--analysis_dir", help="`remoe analyze` output to share (default: MODEL_DIR/analysis when it exists)"
    )
    parser.set_defaults(handler="remoe.hub_cards.push:run")


def _add_continuation_flags(parser) -> None:
    group = parser.add_argument_group("training (passed to `remoe train`; the architecture comes from the checkpoint)")
    _add_run_source(group)
    _add_training_flags(group)
    group.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    _add_controller_flags(group)


def _add_writer_flags(parser) -> None:
    parser.add_argument("--output_dir", required=True, help="folder of the new ReMoE checkpoint")
    parser.add_argument("--dtype", help="dtype of the result, e.g. bfloat16 (default: the source's)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")


def _add_topk_routing_flags(parser, renormalize_default: str, sampling_default: str) -> None:
    """--[no_]router_renormalize and --[no_]router_sampling (TopK only); None when not given."""
    flags = (
        (
            "router_renormalize",
            "renormalise the k kept softmax gates to sum 1 (BTX's SoftMax(TopK(Wx)))",
            "keep the softmax values (the ReMoE paper's TopK baseline)",
            renormalize_default,
        ),
        (
            "router_sampling",
            "in training, sample the k experts from the router softmax (BTX's sample top-1)",
            "always route to the top-k",
            sampling_default,
        ),
    )
    for name, on, off, default in flags:
        group = parser.add_mutually_exclusive_group()
        group.add_argument(f"--{name}", action="store_const", const=True, help=f"TopK: {on} (default: {default})")
        group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False, help=f"TopK: {off}")


def add_btx_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "btx",
        help="Branch-Train-MiX: branch a seed into domain experts, mix them into an MoE, finetune, evaluate",
        description="Branch-Train-MiX (Sukhbaatar et al. 2024) with ReLU (ReMoE) or TopK routing.",
    )
    steps = parser.add_subparsers(dest="btx_command", required=True)

    branch = steps.add_parser(
        "branch",
        help="train one expert per domain from a seed checkpoint",
        description="Write one `remoe train` job per domain (or dataset) continuing the seed, and run them in order.",
    )
    branch.add_argument("seed_model", help="dense seed: Llama / Mistral / Qwen2 or dense ReMoE folder")
    branch.add_argument("--output_dir", required=True, help="where seed/, expert-NAME/ and the job files go")
    which = branch.add_mutually_exclusive_group(required=True)
    which.add_argument("--domains", nargs="+", help="one expert per domain of --dataset (builtin: code docs math)")
    which.add_argument("--datasets", nargs="+", help="one expert per dataset (file, folder or Hub name)")
    branch.add_argument("--dataset", help="dataset of --domains (default: builtin)")
    branch.add_argument("--dry_run", action="store_true", help="write the job files only")
    _add_continuation_flags(branch)
    branch.set_defaults(handler="remoe.training.btx:run_branch")

    mix = steps.add_parser(
        "mix",
        help="merge dense experts into one MoE checkpoint",
        description="Each source's FFNs become one expert per layer; attention, norms and embeddings are averaged "
        "(or taken from the seed); a new ReLU or TopK router is initialised.",
    )
    mix.add_argument("sources", nargs="+", help="expert folders, or one `remoe btx branch` output folder")
    mix.add_argument("--seed_model", help="the seed (default: a branch folder's seed)")
    mix.add_argument("--seed_as_expert", action="store_true", help="add the seed as a generalist expert")
    mix.add_argument("--router_type", choices=MIX_ROUTER_TYPES, default="relu")
    mix.add_argument("--num_experts_per_tok", type=positive_int, default=2, help="k (default 2)")
    _add_topk_routing_flags(mix, "on", "off")
    mix.add_argument("--shared", choices=SHARED_MODES, default="average")
    mix.add_argument("--router_init", choices=ROUTER_INITS, default="random")
    mix.add_argument("--router_texts", nargs="+", help="centroid init: one text/jsonl file per source")
    mix.add_argument("--domains", nargs="+", help="centroid init: one domain of --dataset per source")
    mix.add_argument("--dataset", help="dataset of --domains (default: builtin)")
    mix.add_argument(
        "--router_max_tokens", type=positive_int, default=4096, help="centroid init: tokens per source (default 4096)"
    )
    mix.add_argument("--split", type=positive_int, default=1, help="cut every FFN into C experts (granularity)")
    mix.add_argument(
        "--blend",
        action="store_true",
        help="BTX's blending-experts ablation: expert j is chunk j of every source's FFN (no domain experts)",
    )
    mix.add_argument("--expert_names", nargs="+", help="one name per source (default: folder names)")
    mix.add_argument(
        "--router_std",
        type=_positive_float,
        help="random init: std of the router (default: initializer_range)",
    )
    mix.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the router")
    _add_writer_flags(mix)
    _add_controller_flags(mix)
    mix.set_defaults(handler="remoe.training.btx:run_mix")

    finetune = steps.add_parser(
        "finetune",
        help="MoE finetuning of a mixed model on all domains",
        description="`remoe train` continuing an MoE checkpoint: L1 controller (ReLU) or load balancing (TopK).",
    )
    finetune.add_argument("model", help="a ReMoE MoE checkpoint (from mix, upcycle or convert)")
    finetune.add_argument("--output_dir", required=True)
    finetune.add_argument("--domains", nargs="+", help="train on these domains only (default: all)")
    finetune.add_argument("--dataset", help="dataset (default: builtin)")
    finetune.add_argument("--freeze_experts", action="store_true", help="train everything but the experts")
    _add_topk_routing_flags(finetune, "the checkpoint's", "the checkpoint's")
    _add_continuation_flags(finetune)
    finetune.set_defaults(handler="remoe.training.btx:run_finetune")

    evaluate = steps.add_parser(
        "eval",
        help="per-domain validation loss and routing shares (markdown); --btm: the branches as a BTM ensemble",
        description="Per-domain validation loss of each model (and routing shares of MoEs). --btm MODEL... adds the "
        "Branch-Train-Merge baseline: the branch models as an ensemble, each sequence's top-k models by their domain "
        "posterior (Bayes' rule over the models' likelihoods of its prefix), next-token probabilities mixed.",
    )
    evaluate.add_argument("models", nargs="*", help="checkpoint folders")
    evaluate.add_argument("--dataset", default="builtin")
    evaluate.add_argument("--block_size", type=_integer_at_least(2), default=128)
    evaluate.add_argument("--max_eval_blocks", type=positive_int, default=64)
    evaluate.add_argument(
        "--btm", nargs="+", metavar="MODEL", help="BTM ensemble of these dense models, or of one `btx branch` folder"
    )
    evaluate.add_argument("--btm_top_k", type=positive_int, help="models mixed per position (default 2)")
    evaluate.add_argument(
        "--btm_prior",
        choices=("uniform", "cached"),
        help="domain prior: uniform, or BTM's cached prior from held-out blocks of each domain (default uniform)",
    )
    evaluate.add_argument(
        "--btm_prior_blocks", type=positive_int, help="cached prior: held-out blocks per domain (default 16)"
    )
    evaluate.add_argument("--btm_seed_as_expert", action="store_true", help="a branch folder's seed joins the ensemble")
    evaluate.add_argument("--output_json", help="also write the numbers here")
    evaluate.set_defaults(handler="remoe.training.btx:run_eval")


def add_upcycle_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="sparse upcycling: a dense checkpoint becomes an MoE with E copies (or a split) of its FFN",
        description="Sparse upcycling into a ReLU- or TopK-routed ReMoE checkpoint.",
    )
    parser.add_argument("source", help="dense checkpoint: Llama / Mistral / Qwen2 or dense ReMoE")
    parser.add_argument("--num_experts", type=positive_int, required=True, help="E")
    parser.add_argument("--granularity", type=positive_int, default=1, help="cut each expert into G finer experts")
    parser.add_argument("--mode", choices=UPCYCLE_MODES, default="copy")
    parser.add_argument("--router_type", choices=MIX_ROUTER_TYPES, default="relu")
    parser.add_argument("--num_experts_per_tok", type=positive_int, default=1, help="k")
    _add_topk_routing_flags(parser, "on", "off")
    parser.add_argument(
        "--noise", type=_non_negative_float, default=0.0, help="relative std of the noise added to each copy"
    )
    parser.add_argument(
        "--router_std", type=_positive_float, help="std of the random router (default: initializer_range)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    _add_writer_flags(parser)
    _add_controller_flags(parser)
    parser.set_defaults(handler="remoe.training.convert:run_upcycle")


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Mixtral / ReMoE MoE -> ReMoE (ReLU or TopK); Llama / Mistral / Qwen2 -> dense ReMoE",
        description="Convert a Transformers checkpoint into a ReMoE checkpoint.",
    )
    parser.add_argument("source", help="checkpoint folder")
    parser.add_argument(
        "--router_type",
        choices=ROUTER_TYPES,
        help="MoE sources: relu (default; ReLU routing + controller) or topk (keeps the behaviour); dense sources: dense",
    )
    parser.add_argument("--num_experts_per_tok", type=positive_int, help="k (default: the source's)")
    _add_topk_routing_flags(parser, "a ReMoE TopK source's, else on", "a ReMoE TopK source's, else off")
    _add_writer_flags(parser)
    _add_controller_flags(parser)
    parser.set_defaults(handler="remoe.training.convert:run_convert")


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


class _OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="remoe", description="ReLU-routed Mixture-of-Experts for Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or an argument error (already printed)
        return exit_request.code if isinstance(exit_request.code, int) else 0
    module_name, function_name = args.handler.split(":")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
        handler(args)
    except (ValueError, OSError) as error:
        if os.environ.get("REMOE_DEBUG") == "1":
            raise
        print(f"remoe {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"remoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
