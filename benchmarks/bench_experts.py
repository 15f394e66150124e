"""Speed and memory of the sparse expert MLP implementations on the paper's shapes.

For each shape (H=768, I=3072/G, E*G experts of granularity G, T tokens) it times the forward (with gradients
enabled, as in training) and the forward+backward of `remoe.kernels.sparse_moe_mlp` for every implementation, and of
a dense single GEMM with the same FLOPs, `(P, H) @ (H, 3I)` for P routed pairs: the practical ceiling. Gates are
ReLU-like, with a mean of k*G active experts per token (k=1) and a realistic spread (per-token and per-expert
offsets, some tokens with no expert), plus a TopK k=2 case (softmax, top-2, no renormalisation).

    python benchmarks/bench_experts.py                      # CUDA when available: all implementations, all shapes
    python benchmarks/bench_experts.py --device cpu         # torch paths, reduced shape set (implies --quick)
    python benchmarks/bench_experts.py --shapes goal --autocast bf16   # fp32 leaves under bf16 autocast (Trainer bf16)
    python benchmarks/bench_experts.py --output results.json
    TRITON_INTERPRET=1 python benchmarks/bench_experts.py --device cpu --shapes dry_run --implementations triton dense

    python benchmarks/bench_experts.py --remote_code --compare_model_dir OLD_DIR   # the Hub path without `remoe`

`--remote_code` times what a Hub user without `remoe` runs: the shipped `modeling_remoe.py` imported as a standalone
copy with `remoe` blocked, its default experts implementation (and `eager`) through the MoE block's ReLU path, against
`remoe.kernels` `grouped_mm` and `eager`: a training step (forward + backward, T=512, H=768, I=3072, E=8 and 32) and
decoding (a no-grad forward of `--decode_tokens` tokens that use an expert, default 1, at that size and at the tiny
preset's H=128, I=256), round-robin in one process, medians and median per-round ratios; plus the matmuls per
decoding call (aten mm / addmm / bmm, also those inside `grouped_mm`'s CPU kernel). `--compare_model_dir DIR` adds
another copy of the model files (e.g. an older commit's) as a contestant. Writes
`benchmarks/results/bench_experts_remote_code_<device>.json`.

`--shapes goal` is the issue's goal shape (T=16k, E=8, mean k=1, H=768, I=3072) and a large one (H=4096, I=16384);
`dry_run` one toy shape for CPU (the Triton interpreter is slow). An implementation that fails is reported with its
error, not fatal.
Prints a table and writes JSON (default `benchmarks/results/bench_experts_<device>.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from remoe.kernels import IMPLEMENTATIONS, sparse_moe_mlp

HIDDEN, FFN = 768, 3072
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    tokens: int
    experts: int  # before granularity: the layer has experts * granularity experts of size ffn / granularity
    granularity: int
    routing: str  # "relu" (mean k=1 expert per token, times G) or "topk2"
    hidden: int = HIDDEN
    ffn: int = FFN

    @property
    def num_experts(self) -> int:
        return self.experts * self.granularity

    @property
    def intermediate(self) -> int:
        return self.ffn // self.granularity

    def label(self) -> str:
        size = "" if (self.hidden, self.ffn) == (HIDDEN, FFN) else f" H={self.hidden} I={self.ffn}"
        return f"T={self.tokens} E={self.experts} G={self.granularity} {self.routing}{size}"


GOAL_SHAPE = Shape(16384, 8, 1, "relu")
TINY_PRESET_SHAPE = Shape(2048, 8, 1, "relu", hidden=128, ffn=256)  # the `tiny` preset's MoE layer, batch 16 x 128
SHAPE_SETS = {
    "goal": [GOAL_SHAPE, Shape(16384, 8, 1, "relu", hidden=4096, ffn=16384)],
    "dry_run": [Shape(32, 4, 1, "relu", hidden=16, ffn=32)],
}


def paper_shapes(quick: bool) -> list[Shape]:
    if quick:
        shapes = [Shape(512, 8, 1, "relu"), Shape(512, 8, 8, "relu"), Shape(512, 32, 1, "relu")]
        return [*shapes, Shape(512, 8, 1, "topk2"), TINY_PRESET_SHAPE]
    shapes = [Shape(tokens, 8, 1, "relu") for tokens in (4096, 16384, 32768)]
    shapes += [Shape(16384, experts, granularity, "relu") for experts in (8, 32, 128) for granularity in (1, 8)]
    shapes.append(Shape(16384, 8, 1, "topk2"))
    return list(dict.fromkeys(shapes))


def make_gates(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """(T, E*G) non-negative gates; ReLU routing keeps the top 1/E share of all logits (mean G experts per token)."""
    logits = torch.randn(shape.tokens, shape.num_experts, generator=generator)
    if shape.routing == "topk2":
        probs = logits.softmax(-1)
        top = probs.topk(2, dim=-1)
        return torch.zeros_like(probs).scatter_(1, top.indices, top.values)
    token_shift = 0.5 * torch.randn(shape.tokens, 1, generator=generator)
    expert_shift = 0.3 * torch.randn(1, shape.num_experts, generator=generator)
    logits = logits + token_shift + expert_shift
    active = shape.tokens * shape.granularity
    threshold = logits.flatten().kthvalue(logits.numel() - active + 1).values
    return torch.relu(logits - threshold)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gates = make_gates(shape, generator)
    # weights drawn on the device: the H=4096 shape has 1.6 G weights, slow to draw on the host
    device_generator = torch.Generator(device).manual_seed(seed)
    experts, hidden, intermediate = shape.num_experts, shape.hidden, shape.intermediate

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=device_generator, device=device)

    hidden_states = randn(shape.tokens, hidden)
    gate_up_proj = randn(experts, 2 * intermediate, hidden) / hidden**0.5
    down_proj = randn(experts, hidden, intermediate) / intermediate**0.5
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden_states, gates, gate_up_proj, down_proj)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, statistic: str) -> float:
    """Median or minimum wall time of `fn` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times) if statistic == "median" else min(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory that one call allocates on top of what is already allocated (CUDA only)."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


@dataclass
class Result:
    shape: str
    tokens: int
    num_experts: int
    granularity: int
    routing: str
    pairs: int
    implementation: str
    forward_ms: float | None
    forward_backward_ms: float | None
    forward_tflops: float | None
    forward_backward_tflops: float | None
    peak_memory_mib: float | None
    error: str | None = None


_MEASUREMENTS = ("forward_ms", "forward_backward_ms", "forward_tflops", "forward_backward_tflops", "peak_memory_mib")


@dataclass
class Settings:
    dtype: torch.dtype
    device: torch.device
    warmup: int
    repeats: int
    statistic: str
    autocast: torch.dtype | None = None  # forward under torch.autocast with this dtype (leaves stay in `dtype`)

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def benchmark_shape(shape: Shape, implementations: list[str], settings: Settings) -> list[Result]:
    device, dtype = settings.device, settings.dtype
    inputs = make_inputs(shape, dtype, device)
    pairs = int((inputs[1] != 0).sum())
    flops = 6 * pairs * shape.hidden * shape.intermediate  # gate_up (2*H*2I) + down (2*I*H) per pair
    grad_output = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype)
    dense_x = torch.randn(pairs, shape.hidden, device=device, dtype=dtype, requires_grad=True)
    dense_w = torch.randn(shape.hidden, 3 * shape.intermediate, device=device, dtype=dtype, requires_grad=True)
    dense_grad = torch.randn(pairs, 3 * shape.intermediate, device=device, dtype=dtype)

    results = []
    for name in implementations:
        if name == "dense":
            leaves = [dense_x, dense_w]

            def forward():
                with settings.forward_context():
                    return dense_x @ dense_w

            def forward_backward():
                forward().backward(dense_grad)
        else:
            leaves = inputs

            def forward(name=name):
                with settings.forward_context():
                    return sparse_moe_mlp(*inputs, implementation=name)

            def forward_backward(forward=forward):
                forward().backward(grad_output)

        def training_step(leaves=leaves, forward_backward=forward_backward):
            for leaf in leaves:
                leaf.grad = None
            forward_backward()

        timing = (device, settings.warmup, settings.repeats, settings.statistic)
        identity = dict(
            shape=shape.label(),
            tokens=shape.tokens,
            num_experts=shape.num_experts,
            granularity=shape.granularity,
            routing=shape.routing,
            pairs=pairs,
            implementation=name,
        )
        try:
            forward_ms = time_ms(forward, *timing)
            forward_backward_ms = time_ms(training_step, *timing)
            result = Result(
                **identity,
                forward_ms=forward_ms,
                forward_backward_ms=forward_backward_ms,
                forward_tflops=flops / forward_ms / 1e9,
                forward_backward_tflops=3 * flops / forward_backward_ms / 1e9,
                peak_memory_mib=peak_memory_mib(training_step, device),
            )
        except Exception as error:  # reported, not fatal: the other implementations still run
            message = f"{type(error).__name__}: {error}"[:500]
            result = Result(**identity, **dict.fromkeys(_MEASUREMENTS), error=message)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(_format_row(result), flush=True)
    return results


_HEADER = f"{'shape':<36} {'pairs':>7} {'impl':<11} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>8} {'f+b TF/s':>8} {'peak MiB':>9}"


def _format_row(result: Result) -> str:
    if result.error is not None:
        return f"{result.shape:<36} {result.pairs:>7} {result.implementation:<11} {result.error}"
    memory = f"{result.peak_memory_mib:9.0f}" if result.peak_memory_mib is not None else f"{'n/a':>9}"
    return (
        f"{result.shape:<36} {result.pairs:>7} {result.implementation:<11} {result.forward_ms:>9.2f} "
        f"{result.forward_backward_ms:>9.2f} {result.forward_tflops:>8.3f} {result.forward_backward_tflops:>8.3f} {memory}"
    )


def goal_summary(results: list[Result], shape: Shape = GOAL_SHAPE) -> dict[str, float] | None:
    """The issue's goals on E=8, G=1, 16k tokens, mean k=1: triton against grouped_mm, eager and the dense GEMM."""
    by_name = {r.implementation: r for r in results if r.shape == shape.label() and r.error is None}
    if not {"triton", "grouped_mm", "eager", "dense"} <= by_name.keys():
        return None
    triton, grouped, eager, dense = (by_name[name] for name in ("triton", "grouped_mm", "eager", "dense"))
    summary = {
        "speedup_vs_grouped_mm": grouped.forward_backward_ms / triton.forward_backward_ms,
        "speedup_vs_eager": eager.forward_backward_ms / triton.forward_backward_ms,
        "fraction_of_dense_tflops": triton.forward_backward_tflops / dense.forward_backward_tflops,
    }
    if triton.peak_memory_mib is not None and grouped.peak_memory_mib:
        summary["memory_vs_grouped_mm"] = triton.peak_memory_mib / grouped.peak_memory_mib
    return summary


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def import_remote_code(model_dir: Path, package: str):
    """`model_dir`'s `modeling_remoe.py` and `configuration_remoe.py` imported as the package `package`, the way
    Transformers imports Hub remote code, with every `remoe` module blocked (as where `remoe` is not installed)."""
    import importlib
    import shutil
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="remoe_remote_")) / package
    folder.mkdir()
    for name in ("modeling_remoe.py", "configuration_remoe.py"):
        shutil.copy(model_dir / name, folder / name)
    (folder / "__init__.py").write_text("")
    hidden = {name: module for name, module in sys.modules.items() if name == "remoe" or name.startswith("remoe.")}
    sys.modules.update(dict.fromkeys(hidden))  # None: `import remoe...` raises ImportError
    sys.path.insert(0, str(folder.parent))
    try:
        modeling = importlib.import_module(f"{package}.modeling_remoe")
    finally:
        sys.path.remove(str(folder.parent))
        for name in hidden:
            del sys.modules[name]
        sys.modules.update(hidden)
    if "triton" in modeling.REMOE_EXPERTS_FUNCTIONS:
        raise RuntimeError("the remote-code copy imported remoe.kernels")
    return modeling, importlib.import_module(f"{package}.configuration_remoe")


def count_matmuls(fn: Callable[[], object]) -> int:
    """aten mm / addmm / bmm calls of one `fn()`, including those inside `grouped_mm`'s CPU kernel."""
    from torch.profiler import profile

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key in ("aten::mm", "aten::addmm", "aten::bmm"))


def _remote_code_shape(
    shape: Shape, train_step: bool, contestants_code: dict, args: argparse.Namespace, rounds: int, report: dict
) -> None:
    """One `--remote_code` shape (decoding only unless `train_step`), rows appended to `report['results']`. Ratios
    are medians over the rounds of each round's ratio to remoe.kernels' grouped_mm (robust to the load drifting)."""
    experts = shape.experts
    device, decode_tokens = torch.device(args.device), args.decode_tokens
    decode_calls = 10 if shape.hidden >= 768 else 100
    # One set of leaves for every contestant (the experts modules hold the same Parameters), gradients dropped after
    # each step: one copy of the weights and their gradients in memory, whoever runs.
    hidden_states, gates, gate_up_proj, down_proj = make_inputs(shape, torch.float32, device)
    gate_up_proj, down_proj = torch.nn.Parameter(gate_up_proj.detach()), torch.nn.Parameter(down_proj.detach())
    leaves = (hidden_states, gates, gate_up_proj, down_proj)
    grad_output = torch.randn(shape.tokens, shape.hidden, device=device)
    routed = (gates.detach() != 0).any(dim=1).nonzero().flatten()[:decode_tokens]  # tokens that use an expert
    decode_states, decode_gates = hidden_states.detach()[routed], gates.detach()[routed]
    contestants = {}
    for name, implementation in (("remoe.kernels", "grouped_mm"), ("remoe.kernels", "eager")):

        def train(implementation=implementation):
            sparse_moe_mlp(*leaves, implementation=implementation).backward(grad_output)
            for leaf in leaves:
                leaf.grad = None

        def decode(implementation=implementation):
            with torch.no_grad():
                sparse_moe_mlp(decode_states, decode_gates, gate_up_proj, down_proj, implementation=implementation)

        contestants[(name, implementation)] = (train, decode)
    for code_name, (modeling, configuration) in contestants_code.items():
        config = configuration.ReMoEConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.ffn,
            num_experts=experts,
            num_attention_heads=12,
            num_key_value_heads=12,
        )
        tiny = configuration.ReMoEConfig(
            hidden_size=16,
            intermediate_size=32,
            num_experts=experts,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
        )
        default = modeling.ReMoEForCausalLM(tiny).config._experts_implementation  # what from_pretrained picks
        for implementation in dict.fromkeys((default, "eager")):
            layer_config = config.__class__.from_dict(config.to_dict())
            layer_config._experts_implementation = implementation
            module = modeling.ReMoEExperts(layer_config).to(device)
            module.gate_up_proj, module.down_proj = gate_up_proj, down_proj  # the same Parameters

            def train(modeling=modeling, module=module):
                modeling.experts_over_active_pairs(module, hidden_states, gates).backward(grad_output)
                for leaf in leaves:
                    leaf.grad = None

            def decode(modeling=modeling, module=module):
                with torch.no_grad():
                    modeling.experts_over_active_pairs(module, decode_states, decode_gates)

            label = f"remote code{'' if code_name == 'remote' else ' ' + str(args.compare_model_dir)}"
            label += " (default)" if implementation == default else ""
            contestants[(label[:34], implementation)] = (train, decode)
    times = {key: ([], []) for key in contestants}
    if not train_step:
        contestants = {key: (None, decode) for key, (_, decode) in contestants.items()}
    for train, decode in contestants.values():  # warmup
        if train is not None:
            train()
        decode()
    for round_index in range(rounds):
        keys = list(contestants)
        keys = keys[round_index % len(keys) :] + keys[: round_index % len(keys)]  # rotating order
        for key in keys:
            train, decode = contestants[key]
            if train is not None:
                start = time.perf_counter()
                train()
                times[key][0].append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            for _ in range(decode_calls):
                decode()
            times[key][1].append((time.perf_counter() - start) * 1e3 / decode_calls)
    reference_train, reference_decode = times[("remoe.kernels", "grouped_mm")]

    def ratio(values: list[float], reference: list[float]) -> float | None:
        return statistics.median(a / b for a, b in zip(values, reference, strict=True)) if values else None

    for key, (train_times, decode_times) in times.items():
        row = {
            "shape": f"H={shape.hidden} I={shape.ffn} E={experts} T=512"
            if train_step
            else f"H={shape.hidden} I={shape.ffn} E={experts}",
            "num_experts": experts,
            "hidden": shape.hidden,
            "intermediate": shape.ffn,
            "contestant": key[0],
            "implementation": key[1],
            "train_step_ms": statistics.median(train_times) if train_times else None,
            "train_step_vs_remoe_grouped_mm": ratio(train_times, reference_train),
            "decode_ms": statistics.median(decode_times),
            "decode_vs_remoe_grouped_mm": ratio(decode_times, reference_decode),
            "decode_matmuls": count_matmuls(contestants[key][1]),
            "train_step_ms_all": train_times,
            "decode_ms_all": decode_times,
        }
        report["results"].append(row)
        train = (
            f"{row['train_step_ms']:>9.1f} {row['train_step_vs_remoe_grouped_mm']:>6.2f}x"
            if train_times
            else f"{'-':>9} {'-':>7}"
        )
        print(
            f"{row['shape']:<24} {key[0]:<34} {key[1]:<11} {train} {row['decode_ms']:>9.3f} "
            f"{row['decode_vs_remoe_grouped_mm']:>6.2f}x {row['decode_matmuls']:>6}",
            flush=True,
        )


def remote_code_benchmark(args: argparse.Namespace) -> dict:
    """The remote-code default against remoe.kernels' grouped_mm (see the module docstring, `--remote_code`)."""
    device = torch.device(args.device)
    contestants_code = {"remote": import_remote_code(Path(__file__).parents[1] / "modeling_remoe", "remote_remoe")}
    if args.compare_model_dir:
        contestants_code["compare"] = import_remote_code(args.compare_model_dir, "compare_remoe")
    rounds = args.repeats or 9
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "decode_tokens": args.decode_tokens,
        "results": [],
    }
    print(f"# {report['device']}, torch {torch.__version__}, fp32, {torch.get_num_threads()} threads, {rounds} rounds")
    print(
        f"# train: T=512 forward+backward; decode: no-grad forward of {args.decode_tokens} token(s); ratio: median of"
    )
    print("# per-round ratios to remoe.kernels grouped_mm; mm: aten matmuls per decode call (also inside grouped_mm)")
    header = (
        f"{'shape':<24} {'contestant':<34} {'impl':<11} {'train ms':>9} {'ratio':>7} {'decode ms':>9} {'ratio':>7} "
        f"{'mm':>6}"
    )
    print(header)
    print("-" * len(header))
    for experts in (8, 32):
        _remote_code_shape(Shape(512, experts, 1, "relu"), True, contestants_code, args, rounds, report)
    for experts in (8, 32):  # the tiny preset's layer size: decoding is dominated by per-matmul overhead
        shape = Shape(512, experts, 1, "relu", hidden=128, ffn=256)
        _remote_code_shape(shape, False, contestants_code, args, rounds, report)
    output = args.output or Path(__file__).parent / "results" / f"bench_experts_remote_code_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {output}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="reduced shape set (512 tokens, E*G <= 64); implied on CPU"
    )
    parser.add_argument(
        "--shapes", choices=["paper", "quick", *SHAPE_SETS], help="shape set (default: paper on CUDA, quick on CPU)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU or with --autocast")
    parser.add_argument(
        "--autocast",
        choices=["bf16", "fp16"],
        help="run the forward under torch.autocast with this dtype, the leaves staying in --dtype (as the Trainer does)",
    )
    parser.add_argument(
        "--implementations", nargs="+", help="subset of triton, grouped_mm, eager, dense (default: all available)"
    )
    parser.add_argument("--warmup", type=int, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, help="default: 10 on CUDA, 5 on CPU")
    parser.add_argument("--statistic", choices=["median", "min"], help="default: median on CUDA, min on CPU (noisier)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/bench_experts_<device>.json")
    parser.add_argument(
        "--remote_code",
        action="store_true",
        help="the Hub remote-code path (model files without remoe) against remoe.kernels; --repeats = rounds (7)",
    )
    parser.add_argument(
        "--compare_model_dir", type=Path, help="with --remote_code: another folder of model files to time as well"
    )
    parser.add_argument(
        "--decode_tokens", type=int, default=1, help="with --remote_code: tokens per decoding call (default 1)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.remote_code:
        return remote_code_benchmark(args)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    # On CPU only the torch paths: the Triton interpreter is far too slow for these shapes.
    available = [name for name in ("triton", "grouped_mm", "eager") if name in IMPLEMENTATIONS]
    implementations = args.implementations or [*(n for n in available if on_cuda or n != "triton"), "dense"]
    unknown = set(implementations) - {*IMPLEMENTATIONS, "dense"}
    if unknown:
        parser.error(f"--implementations: unknown {sorted(unknown)}; choose from {[*IMPLEMENTATIONS, 'dense']}")
    settings = Settings(
        dtype=DTYPES[args.dtype or ("bf16" if on_cuda and not args.autocast else "fp32")],
        autocast=DTYPES[args.autocast] if args.autocast else None,
        device=device,
        warmup=args.warmup if args.warmup is not None else (3 if on_cuda else 1),
        repeats=args.repeats if args.repeats is not None else (10 if on_cuda else 5),
        statistic=args.statistic or ("median" if on_cuda else "min"),
    )
    quick = args.quick or not on_cuda
    if args.shapes in SHAPE_SETS:
        shapes = SHAPE_SETS[args.shapes]
    else:
        shapes = paper_shapes(quick if args.shapes is None else args.shapes == "quick")
    output = args.output or Path(__file__).parent / "results" / f"bench_experts_{device.type}.json"

    name = device_name(device)
    autocast = f" under {settings.autocast} autocast" if settings.autocast else ""
    print(f"# {name}, torch {torch.__version__}, {settings.dtype}{autocast}; H={HIDDEN}, I={FFN}/G unless given")
    print(
        f"# {settings.statistic} of {settings.repeats} runs; forward with gradients enabled; "
        "useful TFLOP/s (6*P*H*I forward, x3 with backward)"
    )
    print(_HEADER)
    print("-" * len(_HEADER))
    output.parent.mkdir(parents=True, exist_ok=True)
    results = []
    report = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "autocast": str(settings.autocast).removeprefix("torch.") if settings.autocast else None,
        "deterministic_triton": os.environ.get("REMOE_TRITON_DETERMINISTIC") == "1",
        "shapes": args.shapes or ("quick" if quick else "paper"),
        "quick": quick,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "statistic": settings.statistic,
    }
    for done, shape in enumerate(shapes, 1):
        results += benchmark_shape(shape, implementations, settings)
        # written after every shape: a run stopped by a time limit keeps the shapes it finished
        report.update(
            complete=done == len(shapes),
            results=[asdict(result) for result in results],
            goals=goal_summary(results),
            summaries={shape.label(): goal_summary(results, shape) for shape in shapes[:done]},
        )
        output.write_text(json.dumps(report, indent=2) + "\n")
    if report["goals"]:
        print(f"# goals ({GOAL_SHAPE.label()}):", json.dumps({k: round(v, 3) for k, v in report["goals"].items()}))
    print(f"# wrote {output}")
    return report


if __name__ == "__main__":
    main()
