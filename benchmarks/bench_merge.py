"""Time and peak memory of `remoe btx mix` against `mergekit-moe` on the same dense Llama sources.

Each merge runs in its own process; wall time is measured around it and peak memory is its maximum resident set size.
Sources: a random Llama seed plus `--num_experts` "domain experts" (the seed with perturbed FFNs, as after branch
training), written with `save_pretrained` in `--dtype`.

Variants (same sources; top-2 routing where both tools have it):
- `remoe mix (base, random)`: shared weights from the seed, random router: what `mergekit-moe gate_mode: random` does.
- `remoe mix (average, random)`: BTX's averaging of attention / norms / embeddings.
- `remoe mix (average, centroid)` and `mergekit-moe (hidden)`: routers from hidden states of the same prompts.

mergekit lives in its own virtual environment so that its pins never touch the main one:

    python -m venv --system-site-packages /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install mergekit==0.1.5
    python benchmarks/bench_merge.py --mergekit_moe /tmp/mergekit-venv/bin/mergekit-moe

Prints a markdown table and writes benchmarks/results/bench_merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=4096),
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000
    ),
}
PROMPTS = {
    "code": ["def main(argv):\n    parser = argparse.ArgumentParser()", "import os\nfor name in os.listdir(path):"],
    "docs": ["The module provides functions for working with", "Return a new list containing all items"],
    "math": ["Question: what is 17 plus 25? Answer: 42.", "Solve for x: 3x + 4 = 19. Answer: x = 5."],
}
RESULTS = Path(__file__).resolve().parent / "results" / "bench_merge.json"
# A small launcher runs each command: Linux keeps a process's peak RSS across fork+exec, so a child forked from this
# (large) process would report at least this process's size. The launcher imports nothing heavy (about 10 MiB).
_LAUNCHER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def make_sources(folder: Path, size: str, dtype: torch.dtype, num_experts: int) -> tuple[Path, list[Path]]:
    """A seed and `num_experts` experts that differ from it in their FFNs only, each with a tokenizer."""
    from remoe.training.data import train_tokenizer

    tokenizer = train_tokenizer([text for prompts in PROMPTS.values() for text in prompts] * 50, vocab_size=300)
    config = LlamaConfig(
        **SIZES[size],
        num_key_value_heads=SIZES[size]["num_attention_heads"] // 4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    paths = []
    for index in range(num_experts + 1):
        path = folder / ("seed" if index == 0 else f"expert{index}")
        if index:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if ".mlp." in name:
                        parameter.add_(torch.randn_like(parameter) * 0.002)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1:]


def measure(command: list[str], log: Path) -> dict[str, float]:
    """Run `command`; wall seconds and its peak resident memory (MiB)."""
    peak_file = log.with_suffix(".maxrss")
    with log.open("w") as handle:
        start = time.perf_counter()
        launcher = [sys.executable, "-c", _LAUNCHER, str(peak_file), *command]
        code = subprocess.call(launcher, stdout=handle, stderr=handle)
        wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{command[0]} failed ({code}); see {log}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(peak_file.read_text()) / 1024, 1)}


def remoe_command(
    seed: Path, experts: list[Path], out: Path, shared: str, router_init: str, prompts: list[list[str]]
) -> list[str]:
    options = {
        "seed_model": str(seed),
        "shared": shared,
        "router_type": "topk",
        "num_experts_per_tok": 2,
        "router_init": router_init,
        "expert_names": [path.name for path in experts],
    }
    if router_init == "centroid":
        options["router_texts"] = prompts
    script = (
        "import json, sys; from remoe.conversion import btx_mix; "
        "btx_mix(json.loads(sys.argv[1]), sys.argv[2], **json.loads(sys.argv[3]))"
    )
    return [sys.executable, "-c", script, json.dumps([str(p) for p in experts]), str(out), json.dumps(options)]


def mergekit_command(
    mergekit_moe: str, seed: Path, experts: list[Path], out: Path, gate_mode: str, dtype: str, prompts: list[list[str]]
) -> list[str]:
    config = {
        "base_model": str(seed),
        "gate_mode": gate_mode,
        "dtype": dtype,
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(path), "positive_prompts": texts} for path, texts in zip(experts, prompts, strict=True)
        ],
    }
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return [mergekit_moe, str(config_path), str(out), "--random-seed", "0", "--quiet"]


def describe_output(out: Path) -> dict:
    """Architecture, size on disk and tensor count of a merged checkpoint."""
    config = json.loads((out / "config.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    tensors = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            tensors += len(list(handle.keys()))
    return {
        "architecture": config.get("architectures", ["?"])[0],
        "experts": config.get("num_experts") or config.get("num_local_experts"),
        "disk_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "tensors": tensors,
        "shards": len(files),
    }


def check_outputs(remoe_out: Path, mergekit_out: Path, experts: list[Path], workdir: Path) -> dict:
    """Both tools put expert i's FFN into expert slot i (mergekit-moe writes Mixtral in the fused Transformers v5
    layout), and `remoe convert` turns mergekit's Mixtral into a ReMoE checkpoint."""
    from remoe.conversion import SafetensorsCheckpoint, convert

    ours, theirs = SafetensorsCheckpoint(remoe_out), SafetensorsCheckpoint(mergekit_out)
    same = True
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp."
        ours_gate_up = ours.get(f"{prefix}experts.gate_up_proj")
        theirs_gate_up = theirs.get(f"{prefix}experts.gate_up_proj")
        for index, path in enumerate(experts):
            source = SafetensorsCheckpoint(path)
            reference = torch.cat([source.get(f"{prefix}gate_proj.weight"), source.get(f"{prefix}up_proj.weight")])
            same &= torch.equal(ours_gate_up[index], reference) and torch.equal(theirs_gate_up[index], reference)
    converted = convert(mergekit_out, workdir / "mergekit-converted", router_type="relu", overwrite=True)
    return {"experts_identical": bool(same), "mergekit_output_converts": (converted / "config.json").is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--num_experts", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mergekit_moe", default=shutil.which("mergekit-moe") or "/tmp/mergekit-venv/bin/mergekit-moe")
    parser.add_argument("--workdir", default="/tmp/bench_merge")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the fastest is reported")
    parser.add_argument("--output_json", default=str(RESULTS))
    args = parser.parse_args()
    if not Path(args.mergekit_moe).exists():
        sys.exit(f"mergekit-moe not found at {args.mergekit_moe}; see the install line in this file's docstring")

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for size in args.sizes:
        folder = workdir / size
        seed, experts = make_sources(folder, size, getattr(torch, args.dtype), args.num_experts)
        domains = list(PROMPTS)
        prompts = [PROMPTS[domains[i % len(domains)]] for i in range(len(experts))]
        with torch.device("meta"):
            params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig.from_pretrained(seed)).parameters())
        ours = partial(remoe_command, seed, experts, prompts=prompts)
        theirs = partial(mergekit_command, args.mergekit_moe, seed, experts, dtype=args.dtype, prompts=prompts)
        variants: dict[str, Callable[[Path], list[str]]] = {
            "remoe mix (base, random)": partial(ours, shared="base", router_init="random"),
            "mergekit-moe (random)": partial(theirs, gate_mode="random"),
            "remoe mix (average, random)": partial(ours, shared="average", router_init="random"),
            "remoe mix (average, centroid)": partial(ours, shared="average", router_init="centroid"),
            "mergekit-moe (hidden)": partial(theirs, gate_mode="hidden"),
        }
        outputs = {}
        for name, command in variants.items():
            out = folder / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            best = None
            for repeat in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                result = measure(command(out), folder / f"{out.name}-{repeat}.log")
                best = result if best is None or result["wall_s"] < best["wall_s"] else best
            outputs[name] = out
            row = {"size": size, "source_params_m": round(params / 1e6, 1), "variant": name, **best}
            row.update(describe_output(out))
            rows.append(row)
            print(json.dumps(row), flush=True)
        checks = check_outputs(outputs["remoe mix (base, random)"], outputs["mergekit-moe (random)"], experts, folder)
        print(f"{size}: {checks}", flush=True)
        rows[-1]["checks"] = checks

    lines = [
        "| size | params per source | variant | wall s | peak RSS MiB | output | experts | disk MiB | tensors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['source_params_m']}M | {row['variant']} | {row['wall_s']} | "
            f"{row['peak_rss_mib']} | {row['architecture']} | {row['experts']} | {row['disk_mib']} | {row['tensors']} |"
        )
    print("\n" + "\n".join(lines))
    version_script = "import importlib.metadata as m; print(m.version('mergekit'))"
    mergekit_python = str(Path(args.mergekit_moe).parent / "python")
    version = subprocess.run([mergekit_python, "-c", version_script], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "bench_merge",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "mergekit": version,
        "num_experts": args.num_experts,
        "dtype": args.dtype,
        "rows": rows,
    }
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
