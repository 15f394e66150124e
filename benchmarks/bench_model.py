"""Model-level speed and memory: ReMoE (each experts implementation), our TopK, and Transformers' Mixtral and
Qwen3-MoE built with the same dimensions, measured in one run so the ratios are fair.

The models are timed in turns (round-robin, rotating order, medians), so a change in the machine's load hits every
contestant alike. For every model and experts implementation: training-step tokens/s (forward, backward, the optimizer
step that `transformers.Trainer` builds from default `TrainingArguments`, `adamw_torch_fused`, and for ReMoE the
controller update) with the peak memory of a step above the model and its optimizer state, prefill tokens/s, and decode
tokens/s with the KV cache. The training step's matmul FLOPs are counted exactly once per model (`FlopCounterMode`, on
the "eager" experts, which compute only the routed pairs) and reported as achieved GFLOP/s; with `--gemm_limit` the
machine's own matmul rate at the experts' GEMM shapes (gate_up and down, forward and both backward products, at the
benchmark's mean tokens per expert) is measured too, for torch.matmul and, on CPU, oneDNN, in every round as one more
contestant, and each row states its fraction of that limit (the faster library; medians over the same rounds for
both) and of torch.matmul's. ReMoE is measured
in its stable stage (III): before timing, its routers are brought to the target sparsity `1 - k/E` by the real
controller (short training at a high learning rate); the experts per token seen while timing are reported. When all
models would not fit in memory together (the 182m preset on a small machine), each is saved once and loaded back for its
turns (`--swap_models`).

    python benchmarks/bench_model.py --presets tiny --output benchmarks/results/bench_model_cpu_tiny.json
    python benchmarks/bench_model.py --presets 182m --batch_size 2 --transformers_implementations eager grouped_mm
    python benchmarks/bench_model.py --presets 182m --autocast bf16   # fp32 weights, bf16 autocast (Trainer bf16: true)
    python benchmarks/bench_model.py --presets tiny --gemm_limit      # + GFLOP/s as a fraction of the matmul limit
    python benchmarks/bench_model.py --presets tiny --keep_freed_memory   # glibc keeps freed memory, as `remoe train`
    python benchmarks/bench_model.py --presets tiny --paper_baselines     # + Hash, Expert Choice, SparseMixer-v2, Lory
    python benchmarks/bench_model.py --presets tiny --paper_baselines --smoke   # every contestant runs (no measurement)

The ReMoE paper's other baselines (`--paper_baselines`, or `--models remoe-hash ...`) are ReMoE models with the same
dimensions and another `router_type`. Lory decodes without a KV cache (the model refuses one: its segment routing needs
state the cache does not keep), so its decode rows recompute the whole sequence for every token (`decode_cache: false`
in the JSON); its FFN merges the experts' weights instead of running an experts implementation, so it has one row. Its
segments are a quarter of `--seq_len` (four per sequence).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainingArguments,
)

from remoe import ReMoEConfig, ReMoEForCausalLM
from remoe.configuration import load_preset
from remoe.kernels import IMPLEMENTATIONS as REMOE_IMPLEMENTATIONS
from remoe.modeling_remoe import CACHE_NAME
from remoe.training.allocator import keep_freed_memory

TRANSFORMERS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_NAMES = ("remoe-relu", "remoe-topk", "mixtral", "qwen3-moe")
# The ReMoE paper's other baselines, built by ReMoE with the same dimensions (`--paper_baselines` adds them all).
BASELINE_NAMES = ("remoe-hash", "remoe-expert_choice", "remoe-sparsemixer", "remoe-lory")
# Models that decode without a KV cache (every step recomputes the whole sequence): Lory's segment routing needs
# state a KV cache does not keep, so the model refuses one.
NO_CACHE_MODELS = ("remoe-lory",)
# Models whose FFN does not go through the experts implementations (Lory merges the experts' weights per segment and
# runs one FFN): measured once, under the first implementation asked for.
MERGED_EXPERTS_MODELS = ("remoe-lory",)


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
    )
    experts, intermediate = dims["num_experts"], dims["intermediate_size"]
    granularity = dims.get("granularity", 1)
    # ReMoE splits each expert into G itself; the Transformers models get the same E*G experts of width I/G, k*G each.
    remoe_common = {**common, "num_experts_per_tok": dims["num_experts_per_tok"], "granularity": granularity}
    fine = {
        **common,
        "num_experts_per_tok": dims["num_experts_per_tok"] * granularity,
        "intermediate_size": intermediate // granularity,
    }

    def remoe_baseline(router_type: str) -> Callable[[], torch.nn.Module]:
        extra = {}
        if router_type == "lory":  # Lory's own rule would give one segment per benchmark sequence: use 4
            extra["router_segment_length"] = max(1, dims.get("bench_seq_len", 128) // 4)
        return lambda: ReMoEForCausalLM(
            ReMoEConfig(
                **remoe_common, intermediate_size=intermediate, num_experts=experts, router_type=router_type, **extra
            )
        )

    baselines = {
        f"remoe-{router_type}": remoe_baseline(router_type)
        for router_type in ("hash", "expert_choice", "sparsemixer", "lory")
        if router_type != "lory" or granularity == 1  # Lory merges whole experts: k=1, G=1 only
    }
    return {
        **baselines,
        "remoe-relu": lambda: ReMoEForCausalLM(
            ReMoEConfig(**remoe_common, intermediate_size=intermediate, num_experts=experts, router_type="relu")
        ),
        "remoe-topk": lambda: ReMoEForCausalLM(
            ReMoEConfig(**remoe_common, intermediate_size=intermediate, num_experts=experts, router_type="topk")
        ),
        "mixtral": lambda: MixtralForCausalLM(
            MixtralConfig(
                **fine,
                num_local_experts=experts * granularity,
                output_router_logits=True,
                router_aux_loss_coef=0.01,
            )
        ),
        "qwen3-moe": lambda: Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **fine,
                moe_intermediate_size=intermediate // granularity,
                num_experts=experts * granularity,
                norm_topk_prob=False,
                output_router_logits=True,
                router_aux_loss_coef=0.01,
            )
        ),
    }


def trainer_optimizer(model: torch.nn.Module, device: torch.device, optim: str | None = None, lr: float = 0.0):
    """The optimizer `transformers.Trainer` builds for `model` with default `TrainingArguments` (or `optim`): its class
    and arguments from `Trainer.get_optimizer_cls_and_kwargs`, at learning rate `lr` (0: the same work, weights
    stay)."""
    with tempfile.TemporaryDirectory(prefix="bench_model_args_") as output_dir:
        options = {"optim": optim} if optim else {}
        args = TrainingArguments(output_dir=output_dir, use_cpu=device.type == "cpu", report_to="none", **options)
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_class(model.parameters(), **{**kwargs, "lr": lr})


def cpu_run_header(args: argparse.Namespace, malloc: dict, dims: dict) -> dict:
    """The first keys of a CPU benchmark's JSON: the machine, the versions, the optimizer, malloc and the settings."""
    return {
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimizer": trainer_optimizer_name(None),
        "malloc": malloc,
        "settings": {**{key: value for key, value in vars(args).items() if key != "output"}, "dims": dims},
    }


def trainer_optimizer_name(optim: str | None) -> str:
    with tempfile.TemporaryDirectory(prefix="bench_model_args_") as output_dir:
        options = {"optim": optim} if optim else {}
        return str(TrainingArguments(output_dir=output_dir, use_cpu=True, report_to="none", **options).optim.value)


def calibrate_to_target(
    model: ReMoEForCausalLM, tokens: torch.Tensor, max_steps: int, tolerance: float, optim: str | None = None
) -> int:
    """Train with the controller until the step sparsity stays within `tolerance` of the target (stage III)."""
    model.controller.l1_coef.fill_(1e-3)  # skip most of stage I: the controller starts near its working range
    optimizer = trainer_optimizer(model, tokens.device, optim, lr=3e-3)
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


def _greedy_decode_without_cache(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds spent decoding `new_tokens` one at a time without a KV cache: every step runs the whole sequence so far
    (what `generate` does for Lory); the first forward over the prompt is excluded, as the prefill of the cached
    decode."""
    sequence = torch.cat([prompt, model(prompt, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_token = model(sequence, use_cache=False).logits[:, -1:].argmax(-1)
        sequence = torch.cat([sequence, next_token], dim=1)
    _sync(prompt.device)
    return time.perf_counter() - start


def _greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds spent decoding `new_tokens` one at a time with the KV cache after the prompt (prefill excluded)."""
    output = model(prompt, use_cache=True)
    cache, next_token = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        output = model(next_token, **{CACHE_NAME: cache}, use_cache=True)  # the installed release's argument name
        cache, next_token = getattr(output, CACHE_NAME), output.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return time.perf_counter() - start


class ModelUnderTest:
    """One compared architecture, its experts implementations and the timings collected for each.

    Resident, the model stays in memory between its turns. Swapped, it is saved once (safetensors) and loaded back with
    `from_pretrained` for each turn, so that only one model is in memory at a time; the optimizer state is then rebuilt
    by an untimed step at the start of every turn.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        implementations: list[str],
        swap_dir: Path | None,
        autocast: torch.dtype | None = None,
        optim: str | None = None,
    ):
        self.name, self.implementations, self.model_class = name, list(implementations), type(model)
        self.optim = optim  # TrainingArguments.optim (None: its default)
        self.train_flops: int | None = None  # matmul FLOPs of one training step (counted once, on "eager" experts)
        self.autocast = autocast  # forwards under torch.autocast with this dtype (the Trainer's bf16/fp16)
        self.model: torch.nn.Module | None = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.swap_path = None if swap_dir is None else swap_dir / name
        if self.swap_path is not None:
            model.save_pretrained(self.swap_path)
            self.model = None
        self.seconds = {
            implementation: {"train": [], "prefill": [], "decode": []} for implementation in implementations
        }
        self.experts_per_token: dict[str, list[float]] = {implementation: [] for implementation in implementations}
        self.peak_mib = dict.fromkeys(implementations, float("nan"))
        self.errors: dict[str, str] = {}

    @property
    def working_implementations(self) -> list[str]:
        return [implementation for implementation in self.implementations if implementation not in self.errors]

    def load(self, tokens: torch.Tensor) -> None:
        """Bring the model into memory with its optimizer state allocated, outside any measurement."""
        if self.model is None:
            self.model = self.model_class.from_pretrained(self.swap_path).to(tokens.device)
        if self.optimizer is None:
            self.optimizer = trainer_optimizer(self.model, tokens.device, self.optim)  # lr 0: same work, weights stay
            for implementation in self.working_implementations:
                try:
                    self.train_step(implementation, tokens)
                    return
                except Exception as error:  # an implementation that does not run here is reported, not fatal
                    self.errors[implementation] = f"{type(error).__name__}: {error}"[:200]
                    self.optimizer.zero_grad(set_to_none=True)

    def unload(self) -> None:
        if self.swap_path is not None:
            self.model = self.optimizer = None
            gc.collect()

    def _forward_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def train_step(self, implementation: str, tokens: torch.Tensor) -> None:
        self.model.set_experts_implementation(implementation)
        self.model.train()
        with self._forward_context(tokens.device):
            loss = self.model(tokens, labels=tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.model, ReMoEForCausalLM):
            self.experts_per_token[implementation].append(self.model.update_l1_coef()["remoe/experts_per_token"])

    def count_train_flops(self, tokens: torch.Tensor) -> None:
        """The matmul FLOPs of one training step's forward and backward (the optimizer step has none), counted with
        the "eager" experts (only the routed pairs are computed, so every implementation is credited the same work)."""
        implementation = "eager" if "eager" in self.working_implementations else self.working_implementations[0]
        self.model.set_experts_implementation(implementation)
        self.model.train()
        with FlopCounterMode(display=False) as counter:
            with self._forward_context(tokens.device):
                loss = self.model(tokens, labels=tokens).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_flops = counter.get_total_flops()

    @property
    def decode_cache(self) -> bool:
        """Whether the model decodes with a KV cache (Lory cannot: it recomputes the sequence at every step)."""
        return self.name not in NO_CACHE_MODELS

    @torch.no_grad()
    def inference(self, implementation: str, tokens: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
        self.model.set_experts_implementation(implementation)
        self.model.eval()
        decode = _greedy_decode if self.decode_cache else _greedy_decode_without_cache
        with self._forward_context(tokens.device):
            _sync(tokens.device)
            start = time.perf_counter()
            self.model(tokens, use_cache=self.decode_cache)
            _sync(tokens.device)
            prefill = time.perf_counter() - start
            return prefill, decode(self.model, tokens[:, : max(1, tokens.shape[1] // 4)], decode_tokens)

    def results(self, tokens: torch.Tensor, decode_tokens: int) -> dict[str, dict[str, float | str]]:
        batch, length = tokens.shape
        results = {}
        for implementation in self.implementations:
            if implementation in self.errors:
                results[implementation] = {"error": self.errors[implementation]}
                continue
            median = {key: statistics.median(values) for key, values in self.seconds[implementation].items()}
            results[implementation] = {
                "train_tokens_per_s": batch * length / median["train"],
                "train_peak_mib": self.peak_mib[implementation],
                "prefill_tokens_per_s": batch * length / median["prefill"],
                "decode_tokens_per_s": batch * decode_tokens / median["decode"],
                "decode_cache": self.decode_cache,
            }
            if not self.decode_cache:
                results[implementation]["decode_note"] = (
                    "no KV cache: every decoded token recomputes the whole sequence (the model refuses a cache)"
                )
            if self.name in MERGED_EXPERTS_MODELS:
                results[implementation]["experts_note"] = (
                    "the experts' weights are merged per segment into one FFN; no experts implementation runs"
                )
            if self.train_flops:
                results[implementation]["train_flops_per_step"] = self.train_flops
                results[implementation]["train_gflops"] = self.train_flops / median["train"] / 1e9
            results[implementation]["train_seconds_per_round"] = [
                round(seconds, 6) for seconds in self.seconds[implementation]["train"]
            ]
            if self.experts_per_token[implementation]:
                results[implementation]["experts_per_token"] = statistics.fmean(self.experts_per_token[implementation])
        return results


def _rotated(items: list, shift: int) -> list:
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def measure_round_robin(
    models: list[ModelUnderTest],
    tokens: torch.Tensor,
    decode_tokens: int,
    repeats: int,
    probe: Callable[[], None] | None = None,
) -> None:
    """Warm up every implementation once (measuring the peak memory of a training step once the optimizer state
    exists), then time the models in turns, `repeats` rounds, with the order rotating, so that a change in the
    machine's load hits every contestant alike; medians are reported. `probe` (the GEMM limit) takes its turn in
    every round like a model."""
    for model in tqdm(models, desc="warm-up", leave=False):
        model.load(tokens)
        for implementation in model.working_implementations:
            try:
                with PeakMemory(tokens.device) as memory:
                    model.train_step(implementation, tokens)
                model.peak_mib[implementation] = memory.peak_mib
                model.inference(implementation, tokens, 2)
            except Exception as error:  # an implementation that does not run here is reported, not fatal
                model.errors[implementation] = f"{type(error).__name__}: {error}"[:200]
        if model.working_implementations:
            model.count_train_flops(tokens)
        model.unload()
    for round_index in tqdm(range(repeats), desc="rounds", leave=False):
        for model in _rotated([*models, probe] if probe else models, round_index):
            if model is probe:
                probe()
                continue
            model.load(tokens)
            for implementation in _rotated(model.working_implementations, round_index):
                _sync(tokens.device)
                start = time.perf_counter()
                model.train_step(implementation, tokens)
                _sync(tokens.device)
                model.seconds[implementation]["train"].append(time.perf_counter() - start)
                prefill, decode = model.inference(implementation, tokens, decode_tokens)
                model.seconds[implementation]["prefill"].append(prefill)
                model.seconds[implementation]["decode"].append(decode)
            model.unload()


def expert_gemm_shapes(dims: dict, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the six matmuls of one expert in a training step at the mean tokens per expert: gate_up and down,
    each forward (x @ W.T), input gradient (dy @ W) and weight gradient (dy.T @ x), laid out as autograd runs them."""
    granularity = dims.get("granularity", 1)
    hidden, intermediate = dims["hidden_size"], dims["intermediate_size"] // granularity
    per_expert = max(1, round(tokens * dims["num_experts_per_tok"] / dims["num_experts"]))  # k*G / (E*G)
    return {
        "gate_up_forward": (per_expert, hidden, 2 * intermediate),
        "gate_up_input_grad": (per_expert, 2 * intermediate, hidden),
        "gate_up_weight_grad": (2 * intermediate, per_expert, hidden),
        "down_forward": (per_expert, intermediate, hidden),
        "down_input_grad": (per_expert, hidden, intermediate),
        "down_weight_grad": (hidden, per_expert, intermediate),
    }


def _matmul_operands(m: int, k: int, n: int, name: str, device: torch.device, dtype: torch.dtype):
    """Operands with the strides autograd hands to the matmul: a weight used transposed (forward), an activation
    transposed for the weight gradient."""
    if name.endswith("forward"):
        return torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype).t()
    if name.endswith("weight_grad"):
        return torch.randn(k, m, device=device, dtype=dtype).t(), torch.randn(k, n, device=device, dtype=dtype)
    return torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` through oneDNN's fp32/bf16 inner product, which torch's CPU builds ship (and use for convolutions and
    compiled inference) but not for `torch.matmul`, which calls MKL. The fp32 product stays fp32."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm_libraries(device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """The matmul libraries measured here: torch.matmul (MKL on x86 CPUs), and on CPU oneDNN where torch has it,
    for fp32 and bf16 (`bench_gemm_library.py` times an experts path through it)."""
    libraries = {"torch.matmul": torch.matmul}
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_available():
        libraries["onednn"] = onednn_matmul
    return libraries


def _time_per_call(matmul: Callable, a: torch.Tensor, b: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Median of 5 runs of at least `seconds / 5` each."""
    for _ in range(3):
        matmul(a, b)
    _sync(device)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 10:
        matmul(a, b)
        calls += 1
    _sync(device)
    calls = max(1, calls * 2)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            matmul(a, b)
        _sync(device)
        timings.append((time.perf_counter() - start) / calls)
    return statistics.median(timings)


def measure_gemm_limit(
    dims: dict, tokens: int, device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.2
) -> dict:
    """The machine's matmul rate at the experts' GEMM shapes, for each library of `gemm_libraries`: each shape timed,
    and a library's rate as all six shapes' FLOPs over their summed time (one expert's training step). The limit is
    the fastest library's rate; the libraries take turns shape by shape."""
    shapes = expert_gemm_shapes(dims, tokens)
    libraries = gemm_libraries(device, dtype)
    rates = {library: {} for library in libraries}
    seconds_by_library = dict.fromkeys(libraries, 0.0)
    total_flops = 0.0
    for name, (m, k, n) in shapes.items():
        a, b = _matmul_operands(m, k, n, name, device, dtype)
        flops = 2 * m * k * n
        total_flops += flops
        for library, matmul in libraries.items():
            per_call = _time_per_call(matmul, a, b, device, seconds)
            rates[library][name] = {"m": m, "k": k, "n": n, "gflops": flops / per_call / 1e9}
            seconds_by_library[library] += per_call
    by_library = {
        library: {"gflops": total_flops / seconds_by_library[library] / 1e9, "shapes": rates[library]}
        for library in libraries
    }
    best = max(by_library, key=lambda library: by_library[library]["gflops"])
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_expert": shapes["gate_up_forward"][0],
        "gflops": by_library[best]["gflops"],
        "library": best,
        "libraries": by_library,
    }


def _measure_into(rounds: list[dict], *args) -> None:
    rounds.append(measure_gemm_limit(*args))


def summarise_gemm_limits(rounds: list[dict]) -> dict:
    """The GEMM limit over the rounds it was measured in, per library: median GFLOP/s overall and per shape, with
    every round's. The limit is the library with the highest median."""
    first = rounds[0]
    libraries = {}
    for library, measured in first["libraries"].items():
        shapes = {
            name: {
                **shape,
                "gflops": statistics.median(one["libraries"][library]["shapes"][name]["gflops"] for one in rounds),
            }
            for name, shape in measured["shapes"].items()
        }
        per_round = [one["libraries"][library]["gflops"] for one in rounds]
        libraries[library] = {
            "gflops": statistics.median(per_round),
            "gflops_per_round": [round(value, 4) for value in per_round],
            "shapes": shapes,
        }
    best = max(libraries, key=lambda library: libraries[library]["gflops"])
    return {
        "dtype": first["dtype"],
        "tokens_per_expert": first["tokens_per_expert"],
        "gflops": libraries[best]["gflops"],
        "library": best,
        "libraries": libraries,
    }


def training_bytes(build: Callable[[], torch.nn.Module]) -> int:
    """Memory a model needs to train with AdamW (weights, gradients, two moments), counted on the meta device."""
    with torch.device("meta"):
        model = build()
    return 4 * sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        dims = {**load_preset(preset)["model"], **args.model_overrides}
        vocab_size = args.vocab_size or (4096 if preset == "tiny" else 50304)
        torch.manual_seed(0)
        tokens = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), device=device)
        baselines = getattr(args, "paper_baselines_names", [])
        models_asked = list(args.models) + [name for name in baselines if name not in args.models]
        builders = {
            name: build
            for name, build in build_models({**dims, "bench_seq_len": args.seq_len}, vocab_size).items()
            if name in models_asked
        }
        builders = {name: builders[name] for name in models_asked if name in builders}  # the order asked for
        needed = sum(training_bytes(build) for build in builders.values())
        available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
        swap = args.swap_models == "always" or (args.swap_models == "auto" and needed > 0.6 * available)
        if swap:
            transformers.utils.logging.disable_progress_bar()
            print(
                f"# {preset}: all models need {needed / 2**30:.1f} GiB to train, {available / 2**30:.1f} GiB free: "
                "one model in memory at a time, loaded from safetensors for each turn",
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix="bench_model_") as swap_root:
            models, calibration_steps = [], None
            for name, build in builders.items():
                torch.manual_seed(0)
                model = build().to(device)
                if name == "remoe-relu":
                    calibration_steps = calibrate_to_target(
                        model, tokens, args.calibration_steps, tolerance=0.02, optim=args.optim
                    )
                implementations = list(args.transformers_implementations)
                if name.startswith("remoe") and device.type == "cuda" and "triton" in REMOE_IMPLEMENTATIONS:
                    implementations.append("triton")
                if name in MERGED_EXPERTS_MODELS:
                    implementations = implementations[:1]
                swap_dir = Path(swap_root) if swap else None
                models.append(
                    ModelUnderTest(
                        name, model, implementations, swap_dir, AUTOCAST_DTYPES.get(args.autocast), args.optim
                    )
                )
                del model
            limit_rounds, probe = [], None
            if args.gemm_limit:
                dtype = AUTOCAST_DTYPES.get(args.autocast, torch.float32)
                probe = functools.partial(_measure_into, limit_rounds, dims, tokens.numel(), device, dtype)
            measure_round_robin(models, tokens, args.decode_tokens, args.repeats, probe)
        limit = None
        if args.gemm_limit:
            limit = summarise_gemm_limits(limit_rounds)
            args.gemm_limits[preset] = limit
            for library in limit["libraries"]:
                print(_format_limit_row(preset, limit, library), flush=True)
        for model in models:
            for implementation, result in model.results(tokens, args.decode_tokens).items():
                row = {"preset": preset, "model": model.name, "experts": implementation, "swapped": swap, **result}
                if limit is not None and "train_gflops" in row:
                    row["fraction_of_gemm_limit"] = row["train_gflops"] / limit["gflops"]
                    row["fraction_of_matmul_limit"] = row["train_gflops"] / limit["libraries"]["torch.matmul"]["gflops"]
                if model.name == "remoe-relu":
                    row["calibration_steps"] = calibration_steps
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['preset']:>6} {row['model']:<19} {row['experts']:<11} {row['error']}"
    experts = f"{row['experts_per_token']:.2f}" if "experts_per_token" in row else "-"
    if not row.get("decode_cache", True):
        experts += " (decode: no KV cache)"
    gflops = f"{row['train_gflops']:.1f}" if "train_gflops" in row else "-"
    fraction = f"{row['fraction_of_gemm_limit']:.1%}" if "fraction_of_gemm_limit" in row else "-"
    return (
        f"{row['preset']:>6} {row['model']:<19} {row['experts']:<11} {row['train_tokens_per_s']:>10.0f} "
        f"{row['train_peak_mib']:>9.0f} {row['prefill_tokens_per_s']:>11.0f} {row['decode_tokens_per_s']:>10.1f} "
        f"{experts:>8} {gflops:>8} {fraction:>8}"
    )


def _format_limit_row(preset: str, limit: dict, library: str) -> str:
    """One library's GEMM rate as a row of the table, under the models' training-step GFLOP/s, as a fraction of the
    limit (the fastest library)."""
    gflops = limit["libraries"][library]["gflops"]
    label = f"m={limit['tokens_per_expert']} {limit['dtype']}"
    blank = f"{'':>10} {'':>9} {'':>11} {'':>10} {'':>8}"
    return f"{preset:>6} {'gemm: ' + library:<19} {label:<11} {blank} {gflops:>8.1f} {gflops / limit['gflops']:>8.1%}"


OVERRIDABLE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "num_experts",
    "num_experts_per_tok",
    "granularity",
)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, else a usage error naming what is allowed."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def parse_model_overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """`FIELD=N` pairs -> {field: N}, each field one of `OVERRIDABLE_FIELDS` and N an integer >= 1."""
    overrides = {}
    for item in items:
        field, _, value = item.partition("=")
        if field not in OVERRIDABLE_FIELDS or not value.isdigit() or int(value) < 1:
            parser.error(
                f"--model_overrides: {item!r} must be FIELD=N with N an integer >= 1 and FIELD one of "
                f"{', '.join(OVERRIDABLE_FIELDS)}"
            )
        overrides[field] = int(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model sizes from remoe.configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=at_least(1), default=8)
    parser.add_argument("--seq_len", type=at_least(2), default=128)
    parser.add_argument("--decode_tokens", type=at_least(1), default=32)
    parser.add_argument(
        "--repeats", type=at_least(1), default=7, help="rounds of the round-robin (medians are reported)"
    )
    parser.add_argument("--calibration_steps", type=at_least(1), default=150)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_NAMES + BASELINE_NAMES,
        default=list(MODEL_NAMES),
        help=f"contestants (default: {' '.join(MODEL_NAMES)}; the paper's other baselines: {' '.join(BASELINE_NAMES)})",
    )
    parser.add_argument(
        "--paper_baselines",
        action="store_true",
        help="add the ReMoE paper's other baselines (Hash, Expert Choice, SparseMixer-v2, Lory) next to the models; "
        "Lory decodes without a KV cache (it refuses one), which its rows state",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that every contestant runs, not a measurement: 1 round, batch 2 x 32 tokens, 4 decoded "
        "tokens, 2 calibration steps, eager experts only (unless given)",
    )
    parser.add_argument(
        "--transformers_implementations",
        nargs="+",
        default=list(TRANSFORMERS_IMPLEMENTATIONS),
        help="Transformers experts implementations to measure, for every model (ReMoE adds triton on CUDA)",
    )
    parser.add_argument(
        "--swap_models",
        choices=("auto", "always", "never"),
        default="auto",
        help="keep one model in memory at a time, loading it from safetensors for each turn (auto: when all models "
        "would not fit in 60%% of the free memory)",
    )
    parser.add_argument("--vocab_size", type=at_least(2), help="default: 4096 for tiny, 50304 otherwise")
    parser.add_argument(
        "--autocast",
        choices=sorted(AUTOCAST_DTYPES),
        help="timed forwards under torch.autocast with this dtype, weights in fp32 (as the Trainer's bf16/fp16)",
    )
    parser.add_argument(
        "--optim",
        help="TrainingArguments.optim of the timed optimizer step (default: the Trainer's, "
        f"{trainer_optimizer_name(None)})",
    )
    parser.add_argument(
        "--gemm_limit",
        action="store_true",
        help="also measure the machine's matmul GFLOP/s at the experts' GEMM shapes and report each training step's "
        "GFLOP/s as a fraction of it",
    )
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="apply remoe.training.allocator.keep_freed_memory() first, as `remoe train` does (default: glibc's "
        "defaults, every freed multi-MB buffer handed back to the OS)",
    )
    parser.add_argument(
        "--model_overrides",
        nargs="+",
        default=[],
        metavar="FIELD=N",
        help=f"integer model fields that replace the preset's, for every preset ({', '.join(OVERRIDABLE_FIELDS)}), "
        "e.g. num_experts=32 granularity=4",
    )
    parser.add_argument("--output", help="JSON path (default benchmarks/results/bench_model_<device>.json)")
    args = parser.parse_args()
    args.model_overrides = parse_model_overrides(parser, args.model_overrides)
    if args.smoke:
        given = set(sys.argv[1:])
        for flag, value in (
            ("repeats", 1),
            ("batch_size", 2),
            ("seq_len", 32),
            ("decode_tokens", 4),
            ("calibration_steps", 2),
            ("transformers_implementations", ["eager"]),
        ):
            if f"--{flag}" not in given:
                setattr(args, flag, value)
    args.paper_baselines_names = list(BASELINE_NAMES) if args.paper_baselines else []
    malloc = keep_freed_memory() if args.keep_freed_memory else {}
    args.gemm_limits = {}

    print(
        f"{'preset':>6} {'model':<19} {'experts':<11} {'train tok/s':>10} {'peak MiB':>9} {'prefill tok/s':>11} "
        f"{'decode tok/s':>10} {'experts/tok':>8} {'GFLOP/s':>8} {'of limit':>8}"
    )
    rows = run(args)
    gemm_limits = args.gemm_limits
    del args.gemm_limits
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    output = Path(args.output or f"benchmarks/results/bench_model_{torch.device(args.device).type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimizer": trainer_optimizer_name(args.optim),
        "malloc": malloc,
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "paper_baselines_names")},
        "results": rows,
        **({"gemm_limit": gemm_limits} if gemm_limits else {}),
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
