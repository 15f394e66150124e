"""Should the experts multiply with oneDNN instead of torch.matmul (MKL) on this CPU?

torch's CPU matmul calls MKL, which runs its AVX2 code on AMD CPUs even where they have AVX-512; torch also ships
oneDNN, whose fp32 inner product uses AVX-512 where the CPU has it. This measures both, in turns, on one thread:

1. each library's GEMM rate at the experts' six training shapes (`bench_model.measure_gemm_limit`);
2. the training step of one model (the Trainer's optimizer, the same tokens and weights) with `grouped_mm` (the
   default), `eager` (the loop over the experts with rows, `torch.mm`) and `eager-onednn` (the same loop with every
   product, forward and backward, through oneDNN: `eager_experts_forward(..., linear_into=...)`). The first
   `--warmup_rounds` rounds are not counted: oneDNN creates a primitive for every new row count it sees.

Before timing, `eager-onednn`'s logits and gradients are checked against `eager`'s.

    OMP_NUM_THREADS=1 python benchmarks/bench_gemm_library.py --model_overrides hidden_size=512 intermediate_size=1024 \
        max_position_embeddings=256 num_experts=8 --output benchmarks/results/bench_gemm_library_cpu_h512_e8.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from bench_model import (
    at_least,
    build_models,
    calibrate_to_target,
    cpu_run_header,
    measure_gemm_limit,
    onednn_available,
    onednn_matmul,
    parse_model_overrides,
    trainer_optimizer,
)
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from remoe import modeling_remoe
from remoe.configuration import load_preset
from remoe.training.allocator import keep_freed_memory

CONTESTANTS = ("grouped_mm", "eager", "eager-onednn")


def onednn_linear_into(block: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """`out = block @ weight.T` through oneDNN (it has no `out=`: the result is copied in)."""
    out.copy_(onednn_matmul(block, weight.t()))


def use(model: torch.nn.Module, contestant: str) -> None:
    """Switch every experts module of `model` to `contestant`."""
    model.set_experts_implementation("grouped_mm" if contestant == "grouped_mm" else "eager")
    for module in model.modules():
        if isinstance(module, modeling_remoe.ReMoEExperts):
            module.__dict__.pop("forward", None)
            if contestant == "eager-onednn":
                module.forward = functools.partial(
                    modeling_remoe.eager_experts_forward, module, linear_into=onednn_linear_into
                )


def logits_and_gradients(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(tokens, labels=tokens)
    output.loss.backward()
    return output.logits.detach(), [
        parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None
    ]


def check_exact(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[float, int]:
    """The largest difference between `eager-onednn` and `eager` in the logits and every gradient, relative to the
    largest entry (raises beyond fp32 rounding), and how many oneDNN products `eager-onednn`'s step ran."""
    results = {}
    use(model, "eager")
    results["eager"] = logits_and_gradients(model, tokens)
    use(model, "eager-onednn")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        results["eager-onednn"] = logits_and_gradients(model, tokens)
    products = sum(event.count for event in profiler.key_averages() if event.key == "mkldnn::_linear_pointwise")
    worst = 0.0
    for reference, other in zip(
        [results["eager"][0], *results["eager"][1]],
        [results["eager-onednn"][0], *results["eager-onednn"][1]],
        strict=True,
    ):
        worst = max(worst, ((other - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item())
    if worst > 1e-4 or products == 0:
        raise AssertionError(f"eager-onednn differs from eager by {worst:.2e} (relative), {products} oneDNN products")
    model.zero_grad(set_to_none=True)
    return worst, products


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="remoe-relu", choices=["remoe-relu", "remoe-topk"])
    parser.add_argument("--model_overrides", nargs="+", default=[], metavar="FIELD=N")
    parser.add_argument("--batch_size", type=at_least(1), default=4)
    parser.add_argument("--seq_len", type=at_least(2), default=256)
    parser.add_argument("--vocab_size", type=at_least(2), default=4096)
    parser.add_argument(
        "--rounds", type=at_least(1), default=30, help="timed rounds of the round-robin (medians reported)"
    )
    parser.add_argument("--warmup_rounds", type=at_least(0), default=10, help="rounds run first and not counted")
    parser.add_argument("--calibration_steps", type=at_least(1), default=150)
    parser.add_argument("--output", default="benchmarks/results/bench_gemm_library_cpu.json")
    args = parser.parse_args()
    if not onednn_available():
        parser.error("this torch build has no oneDNN inner product (torch.ops.mkldnn._linear_pointwise)")
    overrides = parse_model_overrides(parser, args.model_overrides)
    malloc = keep_freed_memory()
    dims = {"num_experts_per_tok": 1, **load_preset(args.preset)["model"], **overrides}
    torch.manual_seed(0)
    model = build_models(dims, args.vocab_size)[args.model]()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    if args.model == "remoe-relu":
        calibrate_to_target(model, tokens, args.calibration_steps, tolerance=0.02)
    model.train()
    worst, products = check_exact(model, tokens)
    optimizer = trainer_optimizer(model, tokens.device)

    seconds = {contestant: [] for contestant in CONTESTANTS}
    limits = []
    for round_index in tqdm(range(args.warmup_rounds + args.rounds), desc="rounds"):
        batch = torch.randint(0, args.vocab_size, tokens.shape, generator=generator)
        order = CONTESTANTS[round_index % 3 :] + CONTESTANTS[: round_index % 3]
        for contestant in order:
            use(model, contestant)
            start = time.perf_counter()
            model(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_index >= args.warmup_rounds:
                seconds[contestant].append(time.perf_counter() - start)
        if round_index >= args.warmup_rounds and (round_index - args.warmup_rounds) % 5 == 0:
            limits.append(measure_gemm_limit(dims, tokens.numel(), tokens.device, seconds=0.1))

    step = {contestant: statistics.median(values) for contestant, values in seconds.items()}
    libraries = {
        library: statistics.median(limit["libraries"][library]["gflops"] for limit in limits)
        for library in limits[0]["libraries"]
    }
    print(f"{'contestant':<14} {'ms/step':>9} {'tokens/s':>9} {'vs grouped_mm':>14}")
    for contestant, value in step.items():
        print(
            f"{contestant:<14} {1e3 * value:>9.1f} {tokens.numel() / value:>9.0f} {step['grouped_mm'] / value:>13.3f}x"
        )
    for library, gflops in libraries.items():
        print(f"GEMM at the experts' shapes, {library}: {gflops:.1f} GFLOP/s")
    print(f"eager-onednn vs eager: largest relative difference in logits and gradients {worst:.1e}")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **cpu_run_header(args, malloc, dims),
        "step_seconds": step,
        "step_seconds_per_round": seconds,
        "speedup_vs_grouped_mm": {contestant: step["grouped_mm"] / value for contestant, value in step.items()},
        "gemm_gflops": libraries,
        "onednn_max_relative_difference": worst,
        "onednn_products_per_step": products,
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
