"""Where a training step's time goes: one model of `bench_model.py` (same dimensions, optimizer and, for ReMoE, the
calibration to the target sparsity), its steps under `torch.profiler`, the self time of every op grouped into matmul,
attention, optimizer, loss, routing and dispatch, and the rest (elementwise work, copies, allocation). The matmul row
states its own FLOP rate (the step's matmul FLOPs counted with `FlopCounterMode` over the matmul ops' self time) next
to the machine's matmul rate at the experts' shapes (`bench_model.measure_gemm_limit`), so the table separates "the
GEMMs run slower than they could" from "the step does other work".

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model remoe-relu --model_overrides hidden_size=512 \\
        intermediate_size=1024 max_position_embeddings=256 num_experts=8 --batch_size 4 --seq_len 256
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from bench_model import (
    BASELINE_NAMES,
    MODEL_NAMES,
    build_models,
    calibrate_to_target,
    cpu_run_header,
    measure_gemm_limit,
    parse_model_overrides,
    trainer_optimizer,
)
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from remoe import ReMoEForCausalLM
from remoe.configuration import load_preset
from remoe.training.allocator import keep_freed_memory

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm"}
ROUTING_OPS = {
    "aten::nonzero",
    "aten::index",
    "aten::index_put_",
    "aten::_index_put_impl_",
    "aten::index_add_",
    "aten::sort",
    "aten::argsort",
    "aten::bincount",
    "aten::histc",
    "aten::topk",
    "aten::scatter",
    "aten::scatter_",
    "aten::scatter_add_",
    "aten::gather",
    "aten::relu",
    "aten::threshold_backward",
}
OTHER = "elementwise, copies and the rest"


def category(op_name: str) -> str:
    """The category of a profiler op name."""
    name = op_name.lower()
    if op_name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if "adam" in name:
        return "optimizer"
    if "log_softmax" in name or "nll_loss" in name:
        return "loss"
    if op_name in ROUTING_OPS:
        return "routing and dispatch"
    return OTHER


CATEGORIES = ("matmul", "attention", "optimizer", "loss", "routing and dispatch", OTHER)


def profile_steps(model: torch.nn.Module, optimizer, tokens: torch.Tensor, steps: int) -> tuple[dict, list]:
    """Self CPU seconds per step by category, and the top ops, over `steps` profiled training steps."""

    def step() -> None:
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(model, ReMoEForCausalLM):
            model.update_l1_coef()

    for _ in range(2):  # warm-up: optimizer state, allocator
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    seconds, ops = defaultdict(float), []
    for event in profiler.key_averages():
        # Self times add up to the profiled CPU time, each microsecond counted once.
        self_seconds = event.self_cpu_time_total / 1e6 / steps
        seconds[category(event.key)] += self_seconds
        ops.append((event.key, self_seconds, event.count // steps))
    ops.sort(key=lambda op: -op[1])
    return dict(seconds), ops


def matmul_flops_per_step(model: torch.nn.Module, tokens: torch.Tensor, implementation: str) -> int:
    """The matmul FLOPs of a training step's forward and backward, counted on the "eager" experts (one matmul per
    expert with rows: `FlopCounterMode` has no formula for `grouped_mm`; CPU attention kernels are not counted)."""
    model.set_experts_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        model(tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)
    model.set_experts_implementation(implementation)
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "mm" in str(op))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", choices=MODEL_NAMES + BASELINE_NAMES, default="remoe-relu")
    parser.add_argument("--experts_implementation", default="grouped_mm")
    parser.add_argument("--model_overrides", nargs="+", default=[], metavar="FIELD=N")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, help="default: 4096 for tiny, 50304 otherwise")
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps")
    parser.add_argument("--calibration_steps", type=int, default=150)
    parser.add_argument("--top_ops", type=int, default=12)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/profile_step_cpu.json)")
    args = parser.parse_args()
    overrides = parse_model_overrides(parser, args.model_overrides)
    if args.steps < 1 or args.top_ops < 0:
        parser.error("--steps must be >= 1 and --top_ops >= 0")

    malloc = keep_freed_memory()  # as `remoe train` and `bench_model.py --keep_freed_memory`
    dims = {**load_preset(args.preset)["model"], **overrides}
    vocab_size = args.vocab_size or (4096 if args.preset == "tiny" else 50304)
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab_size, (args.batch_size, args.seq_len))
    model = build_models({**dims, "bench_seq_len": args.seq_len}, vocab_size)[args.model]()
    if args.model == "remoe-relu":
        calibrate_to_target(model, tokens, args.calibration_steps, tolerance=0.02)
    model.train()
    optimizer = trainer_optimizer(model, tokens.device)
    flops = matmul_flops_per_step(model, tokens, args.experts_implementation)
    seconds, ops = profile_steps(model, optimizer, tokens, args.steps)
    limit = measure_gemm_limit(dims, args.batch_size * args.seq_len, tokens.device)

    total = sum(seconds.values())
    rows = [
        {"category": label, "ms_per_step": 1e3 * seconds.get(label, 0.0), "share": seconds.get(label, 0.0) / total}
        for label in CATEGORIES
    ]
    matmul_gflops = flops / seconds["matmul"] / 1e9 if seconds.get("matmul") else 0.0
    print(
        f"{args.model} ({args.experts_implementation}), {args.batch_size} x {args.seq_len} tokens, "
        f"{torch.get_num_threads()} thread(s): {1e3 * total:.1f} ms of op self time per step"
    )
    print(f"{'category':<34} {'ms/step':>9} {'share':>7}")
    for row in rows:
        print(f"{row['category']:<34} {row['ms_per_step']:>9.1f} {row['share']:>7.1%}")
    print(
        f"matmul rate inside the step: {matmul_gflops:.1f} GFLOP/s; the machine's matmul limit at the experts' shapes: "
        f"{limit['gflops']:.1f} GFLOP/s ({matmul_gflops / limit['gflops']:.0%}); the whole step: "
        f"{flops / total / 1e9:.1f} GFLOP/s ({flops / total / 1e9 / limit['gflops']:.0%} of the limit)"
    )
    print(f"top {args.top_ops} ops by self time:")
    for name, op_seconds, calls in ops[: args.top_ops]:
        print(f"  {name[:60]:<60} {1e3 * op_seconds:>8.1f} ms {calls:>6} calls  [{category(name)}]")

    output = Path(args.output or "benchmarks/results/profile_step_cpu.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **cpu_run_header(args, malloc, dims),
        "op_seconds_per_step": total,
        "categories": rows,
        "matmul_flops_per_step": flops,
        "matmul_gflops_inside_step": matmul_gflops,
        "step_gflops": flops / total / 1e9,
        "gemm_limit": limit,
        "top_ops": [
            {"op": name, "ms_per_step": 1e3 * op_seconds, "calls_per_step": calls, "category": category(name)}
            for name, op_seconds, calls in ops[: args.top_ops]
        ],
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
