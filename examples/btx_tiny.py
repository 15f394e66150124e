"""Branch-Train-MiX end to end at toy scale on the embedded corpus (a few CPU minutes).

seed (dense) -> three domain experts (code, docs, math; equal steps) -> mix with the seed as a generalist expert
(ReLU with random and centroid routers; BTX's TopK-2 router SoftMax(TopK(Wx)), renormalised, and for comparison the
un-renormalised TopK-2 of the ReMoE paper's baseline; BTX's sample top-1; the blending-experts ablation) -> MoE finetune on all domains; against the
seed, each expert, the BTM baseline (the experts and the seed as a top-2 ensemble weighted by their domain posterior,
no training), sparse upcycling of the seed (ReLU and TopK-2) and a dense model trained on all data, both with the same
training tokens as BTX after the seed (3 x branch steps + finetune steps). Every model is evaluated on the same
validation blocks of each domain, with the MoEs' routing shares per domain.

    python examples/btx_tiny.py [--work_dir outputs/btx-tiny] [--seed_steps 200 --branch_steps 100 --finetune_steps 100]

Prints every `remoe` command it runs, then the tables; writes benchmarks/results/btx_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import remoe_cli
import torch
import yaml

from remoe.training.btx import evaluate_btm, evaluate_domains, loss_table, routing_table

RUN = {
    "model": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "num_experts": 1,
        "num_experts_per_tok": 1,
        "router_type": "dense",
        "initializer_range": 0.02,
    },
    "data": {"dataset": "builtin", "vocab_size": 2048, "block_size": 64, "max_eval_blocks": 64},
    "training": {
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "learning_rate": 2.0e-3,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": 0.05,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "logging_steps": 20,
        "save_steps": 10_000,
        "disable_tqdm": True,
        "use_cpu": True,
    },
}
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "btx_tiny.json"


def remoe(*argv) -> None:
    """Run one `remoe` command line in this process."""
    argv = [str(arg) for arg in argv]
    print(f"\n$ remoe {shlex.join(argv)}", flush=True)
    if remoe_cli.main(argv) != 0:
        raise SystemExit(f"remoe {argv[0]} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/btx-tiny")
    parser.add_argument("--seed_steps", type=int, default=200)
    parser.add_argument("--branch_steps", type=int, default=100)
    parser.add_argument("--finetune_steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    parser.add_argument("--output_json", default=str(RESULTS))
    parser.add_argument("--eval_only", action="store_true", help="evaluate the checkpoints of an earlier run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "btx_tiny.yaml"
    config.write_text(yaml.safe_dump(RUN, sort_keys=False))
    matched = 3 * args.branch_steps + args.finetune_steps  # training steps after the seed, for every contender
    timings: dict[str, float] = {}

    if args.eval_only and Path(args.output_json).is_file():
        timings = json.loads(Path(args.output_json).read_text()).get("seconds", {})

    def timed(name: str, *argv) -> None:
        if args.eval_only:
            return
        start = time.perf_counter()
        remoe(*argv)
        timings[name] = round(time.perf_counter() - start, 1)

    steps = ("--config", config, "--max_steps")
    timed("seed", "train", *steps, args.seed_steps, "--output_dir", work / "seed")
    branch_args = ("--domains", "code", "docs", "math", "--output_dir", work / "branch")
    timed("branch", "btx", "branch", work / "seed", *branch_args, *steps, args.branch_steps)

    mixes = {
        "btx-relu": ("--router_type", "relu", "--num_experts_per_tok", 2),
        "btx-relu-centroid": ("--router_type", "relu", "--num_experts_per_tok", 2, "--router_init", "centroid"),
        # BTX's router SoftMax(TopK(Wx)): renormalised over the kept experts (the default of --router_type topk)
        "btx-topk2": ("--router_type", "topk", "--num_experts_per_tok", 2),
        "btx-topk2-unnormalised": ("--router_type", "topk", "--num_experts_per_tok", 2, "--no_router_renormalize"),
        "btx-sample-top1": ("--router_type", "topk", "--num_experts_per_tok", 1, "--router_sampling"),
        # the blending-experts ablation: expert j holds chunk j of every domain FFN
        "btx-topk2-blended": ("--router_type", "topk", "--num_experts_per_tok", 2, "--blend"),
    }
    for name, flags in mixes.items():
        mix_args = ("--seed_as_expert", *flags, "--output_dir", work / f"mix-{name}")
        timed(f"mix {name}", "btx", "mix", work / "branch", *mix_args)
        finetune_args = ("--output_dir", work / name, *steps, args.finetune_steps)
        timed(f"finetune {name}", "btx", "finetune", work / f"mix-{name}", *finetune_args)

    for router in ("relu", "topk"):
        name = f"upcycle-{router}" + ("2" if router == "topk" else "")
        upcycle_args = ("--num_experts", 4, "--num_experts_per_tok", 2, "--router_type", router, "--noise", 0.01)
        timed(f"upcycle {name}", "upcycle", work / "seed", *upcycle_args, "--output_dir", work / f"init-{name}")
        finetune_args = ("--output_dir", work / name, *steps, matched)
        timed(f"finetune {name}", "btx", "finetune", work / f"init-{name}", *finetune_args)

    dense_args = ("--model_name_or_path", work / "seed", "--output_dir", work / "dense", *steps, matched)
    timed("dense", "train", *dense_args)

    models = {
        "seed": work / "seed",
        **{f"expert-{d}": work / "branch" / f"expert-{d}" for d in ("code", "docs", "math")},
        "dense (data-matched)": work / "dense",
        "upcycle-relu (data-matched)": work / "upcycle-relu",
        "upcycle-topk2 (data-matched)": work / "upcycle-topk2",
        **{f"{name} mix (no finetune)": work / f"mix-{name}" for name in mixes},
        **{name: work / name for name in mixes},
    }
    block_size, max_blocks = RUN["data"]["block_size"], RUN["data"]["max_eval_blocks"]
    results = {
        name: evaluate_domains(path, block_size=block_size, max_eval_blocks=max_blocks) for name, path in models.items()
    }
    start = time.perf_counter()
    for prior in ("uniform", "cached"):  # BTM: the 3 experts + the seed, top-2 by domain posterior
        btm = evaluate_btm(
            work / "branch", seed_as_expert=True, prior=prior, block_size=block_size, max_eval_blocks=max_blocks
        )
        results[f"btm-top2 ({prior} prior)"] = btm
    timings["eval btm (2 priors)"] = round(time.perf_counter() - start, 1)
    print(f"\nValidation loss per domain ({max_blocks} blocks of {block_size} tokens each):\n")
    print(loss_table(results))
    shown = ("btx-relu-centroid", "btx-topk2", "btx-sample-top1", "btm-top2 (uniform prior)", "btm-top2 (cached prior)")
    for name in (*shown, "btx-relu-centroid mix (no finetune)"):
        print(f"\nRouting shares of {name} (share of each domain's routed token-expert pairs, mean over layers):\n")
        print(routing_table(results[name]))
    report = {
        "example": "btx_tiny",
        "run": RUN,
        "steps": {"seed": args.seed_steps, "branch_per_expert": args.branch_steps, "finetune": args.finetune_steps},
        "matched_steps": matched,
        "tokens_per_step": RUN["training"]["per_device_train_batch_size"] * block_size,
        "seconds": timings,
        "train_seconds": {  # the Trainer's own time of every training run (metrics.json), without start-up and eval
            name: json.loads((path / "metrics.json").read_text())["train_seconds"]
            for name, path in models.items()
            if (path / "metrics.json").is_file()
        },
        "results": results,
    }
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
