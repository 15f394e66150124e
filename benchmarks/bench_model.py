"""Model-level speed and memory: ReMoE (each experts implementation), our TopK, and Transformers' Mixtral and
Qwen3-MoE built with the same dimensions, measured in one run so the ratios are fair.

All models are built first and timed in turns (round-robin, medians), so a change in the machine's load hits every
contestant alike. For every model and experts implementation: training-step tokens/s (forward, backward, AdamW step, and for ReMoE the
controller update) with peak memory, prefill tokens/s, and decode tokens/s with the KV cache. ReMoE is measured in its
stable stage (III): before timing, its routers are brought to the target sparsity `1 - k/E` by the real controller
(short training at a high learning rate); the experts per token seen while timing are reported.

    python benchmarks/bench_model.py --presets tiny 182m --output benchmarks/results/bench_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from remoe import ReMoEConfig, ReMoEForCausalLM
from remoe.configuration import load_preset
from remoe.kernels import IMPLEMENTATIONS as REMOE_IMPLEMENTATIONS

TRANSFORMERS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator statistics, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.peak_mib = max(self.peak - self.start, 0) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_models(dims: dict, vocab_size: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Constructors of every compared architecture with the same hidden size, layers, heads, experts and k."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=dims["hidden_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_key_value_heads"],
        max_position_embeddings=dims["max_position_embeddings"],
        num_experts_per_tok=dims["num_experts_per_tok"],
    )
    experts, intermediate = dims["num_experts"], dims["intermediate_size"]
    return {
        "remoe-relu": lambda: ReMoEForCausalLM(
            ReMoEConfig(**common, intermediate_size=intermediate, num_experts=experts, router_type="relu")
        ),
        "remoe-topk": lambda: ReMoEForCausalLM(
            ReMoEConfig(**common, intermediate_size=intermediate, num_experts=experts, router_type="topk")
        ),
        "mixtral": lambda: MixtralForCausalLM(
            MixtralConfig(
                **common,
                intermediate_size=intermediate,
                num_local_experts=experts,
                output_router_logits=True,
                router_aux_loss_coef=0.01,
            )
        ),
        "qwen3-moe": lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **common,
                moe_intermediate_size=intermediate,
                intermediate_size=intermediate,
                num_experts=experts,
                norm_topk_prob=False,
                output_router_logits=True,
                router_aux_loss_coef=0.01,
            )
        ),
    }


def calibrate_to_target(model: ReMoEForCausalLM, tokens: torch.Tensor, max_steps: int, tolerance: float) -> int:
    """Train with the controller until the step sparsity stays within `tolerance` of the target (stage III)."""
    model.controller.l1_coef.fill_(1e-3)  # skip most of stage I: the controller starts near its working range
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    inside = 0
    for step in range(1, max_steps + 1):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsity = model.update_l1_coef()["remoe/sparsity"]
        inside = inside + 1 if abs(sparsity - model.config.target_sparsity) <= tolerance else 0
        if inside >= 3:
            return step
    return max_steps


def _greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds spent decoding `new_tokens` one at a time with the KV cache after the prompt (prefill excluded)."""
    output = model(prompt, use_cache=True)
    past_key_values, next_token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        output = model(next_token, past_key_values=past_key_values, use_cache=True)
        past_key_values, next_token = output.past_key_values, output.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - start


class Contestant:
    """One (model, experts implementation) pair with its optimizer and the timings collected so far."""

    def __init__(self, name: str, implementation: str, model: torch.nn.Module):
        self.name, self.implementation, self.model = name, implementation, model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # same work as training, weights stay put
        self.seconds: dict[str, list[float]] = {"train": [], "prefill": [], "decode": []}
        self.experts_per_token: list[float] = []
        self.peak_mib = float("nan")
        self.error: str | None = None

    def train_step(self, tokens: torch.Tensor) -> None:
        self.model.set_experts_implementation(self.implementation)
        self.model.train()
        self.model(tokens, labels=tokens).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.model, ReMoEForCausalLM):
            self.experts_per_token.append(self.model.update_l1_coef()["remoe/experts_per_token"])

    @torch.no_grad()
    def inference(self, tokens: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
        self.model.set_experts_implementation(self.implementation)
        self.model.eval()
        _sync(tokens.device)
        start = time.perf_counter()
        self.model(tokens, use_cache=True)
        _sync(tokens.device)
        prefill = time.perf_counter() - start
        return prefill, _greedy_decode(self.model, tokens[:, : max(1, tokens.shape[1] // 4)], decode_tokens)

    def result(self, tokens: torch.Tensor, decode_tokens: int) -> dict[str, float | str]:
        if self.error:
            return {"error": self.error}
        batch, length = tokens.shape
        median = {key: statistics.median(values) for key, values in self.seconds.items()}
        result = {
            "train_tokens_per_s": batch * length / median["train"],
            "train_peak_mib": self.peak_mib,
            "prefill_tokens_per_s": batch * length / median["prefill"],
            "decode_tokens_per_s": batch * decode_tokens / median["decode"],
        }
        if self.experts_per_token:
            result["experts_per_token"] = statistics.fmean(self.experts_per_token)
        return result


def measure_round_robin(contestants: list[Contestant], tokens: torch.Tensor, decode_tokens: int, repeats: int) -> None:
    """Warm up each contestant once (measuring its peak memory), then time them in turns, `repeats` rounds, so a
    change in the machine's load hits every contestant alike; medians are reported."""
    for contestant in contestants:
        try:
            with PeakMemory(tokens.device) as memory:
                contestant.train_step(tokens)
            contestant.peak_mib = memory.peak_mib
            contestant.inference(tokens, 2)
        except Exception as error:  # an implementation that does not run here is reported, not fatal
            contestant.error = f"{type(error).__name__}: {error}"[:200]
    active = [contestant for contestant in contestants if contestant.error is None]
    for round_index in range(repeats):
        shift = round_index % max(len(active), 1)
        for contestant in active[shift:] + active[:shift]:
            _sync(tokens.device)
            start = time.perf_counter()
            contestant.train_step(tokens)
            _sync(tokens.device)
            contestant.seconds["train"].append(time.perf_counter() - start)
            prefill, decode = contestant.inference(tokens, decode_tokens)
            contestant.seconds["prefill"].append(prefill)
            contestant.seconds["decode"].append(decode)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        dims = load_preset(preset)["model"]
        vocab_size = args.vocab_size or (4096 if preset == "tiny" else 50304)
        torch.manual_seed(0)
        tokens = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), device=device)
        contestants, calibration_steps = [], None
        for name, build in build_models(dims, vocab_size).items():
            torch.manual_seed(0)
            model = build().to(device)
            if name == "remoe-relu":
                calibration_steps = calibrate_to_target(model, tokens, args.calibration_steps, tolerance=0.02)
            implementations = REMOE_IMPLEMENTATIONS if name.startswith("remoe") else args.transformers_implementations
            for implementation in implementations:
                if implementation != "triton" or device.type == "cuda":
                    contestants.append(Contestant(name, implementation, model))
        measure_round_robin(contestants, tokens, args.decode_tokens, args.repeats)
        for contestant in contestants:
            row = {"preset": preset, "model": contestant.name, "experts": contestant.implementation}
            row.update(contestant.result(tokens, args.decode_tokens))
            if contestant.name == "remoe-relu":
                row["calibration_steps"] = calibration_steps
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['preset']:>6} {row['model']:<11} {row['experts']:<11} {row['error']}"
    experts = f"{row['experts_per_token']:.2f}" if "experts_per_token" in row else "-"
    return (
        f"{row['preset']:>6} {row['model']:<11} {row['experts']:<11} {row['train_tokens_per_s']:>10.0f} "
        f"{row['train_peak_mib']:>9.0f} {row['prefill_tokens_per_s']:>11.0f} {row['decode_tokens_per_s']:>10.1f} "
        f"{experts:>8}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model sizes from remoe.configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="rounds of the round-robin (medians are reported)")
    parser.add_argument("--calibration_steps", type=int, default=150)
    parser.add_argument(
        "--transformers_implementations",
        nargs="+",
        default=list(TRANSFORMERS_IMPLEMENTATIONS),
        help="experts implementations of Mixtral / Qwen3-MoE to measure",
    )
    parser.add_argument("--vocab_size", type=int, help="default: 4096 for tiny, 50304 otherwise")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/bench_model_<device>.json)")
    args = parser.parse_args()

    print(
        f"{'preset':>6} {'model':<11} {'experts':<11} {'train tok/s':>10} {'peak MiB':>9} {'prefill tok/s':>11} "
        f"{'decode tok/s':>10} {'experts/tok':>8}"
    )
    rows = run(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    output = Path(args.output or f"benchmarks/results/bench_model_{torch.device(args.device).type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "results": rows,
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
