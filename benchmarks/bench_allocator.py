"""Training-step speed, page faults and peak memory with glibc's default malloc settings and with
`remoe.training.allocator.keep_freed_memory()` (what `remoe train` applies at start-up).

malloc settings are process-wide, so every measurement is its own subprocess: the tiny preset's ReMoE model with E
experts, one training step (forward, backward, the Trainer's fused AdamW, the controller update) repeated, with the
minor page faults (`resource.getrusage().ru_minflt`) of each step and the process's peak RSS. The settings are measured
in turns (round-robin, a fresh process per turn), medians over all timed steps reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_allocator.py --experts 8 32 --output benchmarks/results/bench_allocator_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/bench_allocator.py --experts 128 --rounds 2 --steps 3 --warmup_steps 3 \
        --output benchmarks/results/bench_allocator_cpu_e128.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("default", "keep_freed_memory")


def worker(args) -> None:
    if args.mode == "keep_freed_memory":
        from remoe.training.allocator import keep_freed_memory

        applied = keep_freed_memory()
    else:
        applied = {}
    import torch

    from remoe import ReMoEConfig, ReMoEForCausalLM
    from remoe.configuration import load_preset

    dims = {**load_preset(args.preset)["model"], "num_experts": args.num_experts}
    torch.manual_seed(0)
    model = ReMoEForCausalLM(ReMoEConfig(**dims, vocab_size=args.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the Trainer's adamw_torch_fused
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def step() -> None:
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_l1_coef()

    for _ in range(args.warmup_steps):
        step()
    seconds, step_faults = [], []
    for _ in range(args.steps):
        before, start = faults(), time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
        step_faults.append(faults() - before)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"applied": applied, "seconds": seconds, "faults": step_faults, "peak_rss_mib": peak_mib}))


def run(args) -> list[dict]:
    environment = {key: value for key, value in os.environ.items() if key != "REMOE_KEEP_FREED_MEMORY"}
    collected = {(experts, mode): [] for experts in args.experts for mode in MODES}
    for round_index in range(args.rounds):
        order = list(collected)
        shift = round_index % len(order)
        for experts, mode in order[shift:] + order[:shift]:
            command = [sys.executable, __file__, "--worker", "--mode", mode, "--num_experts", str(experts)]
            for flag in ("preset", "batch_size", "seq_len", "vocab_size", "steps", "warmup_steps"):
                command += [f"--{flag}", str(getattr(args, flag))]
            completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise RuntimeError(f"worker E={experts} {mode} failed:\n{completed.stderr[-3000:]}")
            collected[(experts, mode)].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    rows = []
    for experts in args.experts:
        baseline = None
        for mode in MODES:
            runs = collected[(experts, mode)]
            seconds = statistics.median(s for run in runs for s in run["seconds"])
            row = {
                "num_experts": experts,
                "mode": mode,
                "applied": runs[0]["applied"],
                "train_tokens_per_s": args.batch_size * args.seq_len / seconds,
                "seconds_per_step": seconds,
                "faults_per_step": statistics.median(f for run in runs for f in run["faults"]),
                "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in runs),
            }
            baseline = baseline or row
            row["speedup"] = baseline["seconds_per_step"] / seconds
            row["peak_rss_ratio"] = row["peak_rss_mib"] / baseline["peak_rss_mib"]
            rows.append(row)
            print(
                f"{experts:>4} {mode:<18} {row['train_tokens_per_s']:>10.0f} {row['speedup']:>8.2f}x "
                f"{row['faults_per_step']:>12.0f} {row['peak_rss_mib']:>10.0f} {row['peak_rss_ratio']:>8.2f}x",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32], help="E values of the tiny model")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per setting, in turns")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup_steps", type=int, default=8, help="untimed steps first (the heap grows to its size)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/bench_allocator_cpu.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--num_experts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"{'E':>4} {'malloc':<18} {'train tok/s':>10} {'speedup':>9} {'faults/step':>12} {'peak MiB':>10} {'peak':>9}"
    )
    rows = run(args)
    output = Path(args.output or "benchmarks/results/bench_allocator_cpu.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": platform.processor() or "cpu",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "worker", "mode")},
        "results": rows,
    }
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
