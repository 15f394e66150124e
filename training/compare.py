"""`remoe compare`: dense, TopK and ReMoE with the same active parameters on the same tokens, over several seeds."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from remoe.configuration_remoe import ROUTER_TYPES
from remoe.records import TrainingMetrics

from .run_config import resolve_run
from .train import train
from .trainer import last_complete_checkpoint

ROUTER_COLORS = {
    "dense": "#7f7f7f",
    "topk": "#1f77b4",
    "relu": "#d62728",
    "hash": "#8c564b",
    "expert_choice": "#2ca02c",
    "sparsemixer": "#9467bd",
    "lory": "#ff7f0e",
}
Run = tuple[TrainingMetrics, list[dict]]  # one seed's metrics.json and log_history.json
Setting = tuple[str, int, int]  # (router type, E, G)


def _run_name(router_type: str, num_experts: int, seed: int, granularity: int = 1) -> str:
    if router_type == "dense":
        return f"dense-seed{seed}"
    return f"{router_type}-E{num_experts}{f'-G{granularity}' if granularity > 1 else ''}-seed{seed}"


def _label(router_type: str, num_experts: int, granularity: int) -> str:
    if router_type == "dense":
        return router_type
    return f"{router_type} E={num_experts}" + (f" G={granularity}" if granularity > 1 else "")


def compare(
    preset: str = "tiny",
    router_types: tuple[str, ...] = ("dense", "topk", "relu"),
    num_experts: tuple[int, ...] = (8,),
    seeds: tuple[int, ...] = (0, 1, 2),
    output_dir: str = "outputs/compare",
    train_options: dict | None = None,
    granularities: tuple[int, ...] = (1,),
) -> dict:
    """Train every (router type, E, G, seed) once (runs with a `metrics.json` are reused) and tabulate the results.

    Several `num_experts` give the expert-count scaling curve, several `granularities` the fine-grained one (the
    paper's G = 1..64 at E = 8: E*G experts of width I/G, TopK routing k*G of them)."""
    if not seeds or not router_types or not num_experts or not granularities:
        raise ValueError("--seeds, --router_types, --num_experts and --granularities each need at least one value")
    unknown = sorted(set(router_types) - set(ROUTER_TYPES))
    if unknown:
        raise ValueError(f"--router_types must be among {list(ROUTER_TYPES)}, got {unknown}")
    output = Path(output_dir)
    planned = []
    settings = [
        (router_type, experts, granularity)
        for router_type in router_types
        for experts in (num_experts if router_type != "dense" else num_experts[:1])
        for granularity in (granularities if router_type != "dense" else (1,))
    ]
    for router_type, experts, granularity in settings:
        for seed in seeds:
            run_dir = output / _run_name(router_type, experts, seed, granularity)
            options = {**(train_options or {}), "router_type": router_type, "seed": seed}
            if not options.get("config"):
                options["preset"] = preset
            options.update(num_experts=experts, output_dir=str(run_dir))
            if granularity > 1:
                options["granularity"] = granularity
            expected = resolve_run(options)  # every configuration is checked before the first run trains
            expected["training"].setdefault("seed", seed)
            if run_dir.is_dir() and any(run_dir.iterdir()):
                _check_reusable(run_dir, expected)
                # An interrupted run of the same configuration: continue it, or start it again.
                if last_complete_checkpoint(run_dir):
                    options["resume_from_checkpoint"] = True
                else:
                    options["overwrite"] = True
            planned.append(((router_type, experts, granularity), run_dir, options))
    runs: dict[Setting, list[Run]] = {}
    for setting, run_dir, options in planned:
        if not (run_dir / TrainingMetrics.FILENAME).exists():
            train(options)
        metrics = TrainingMetrics.load(run_dir)
        log_history = json.loads((run_dir / "log_history.json").read_text())
        runs.setdefault(setting, []).append((metrics, log_history))
    summary = _summarize(runs)
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = _markdown_table(summary)
    (output / "compare.md").write_text(table + "\n")
    _plot_curves(runs, output / "compare_curves.png")
    if len(num_experts) > 1:
        _plot_scaling(summary, output / "expert_scaling.png", "num_experts")
    if len(granularities) > 1:
        _plot_scaling(summary, output / "granularity_scaling.png", "granularity")
    print(table)
    return summary


def _check_reusable(run_dir: Path, expected: dict[str, dict]) -> None:
    """A finished run is reused only if it was trained with the settings asked for now."""
    config_file = run_dir / "run_config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} holds files but no run_config.yaml; remove it or use another --output_dir")
    saved = yaml.safe_load(config_file.read_text()) or {}
    ignored = {"deepspeed", "expert_parallel_size"}
    differences = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} there, {expected[section].get(key)!r} asked"
        for section in ("model", "data", "training")
        for key in sorted(set(saved.get(section, {})) | set(expected[section]), key=str)
        if key not in ignored and saved.get(section, {}).get(key) != expected[section].get(key)
    ]
    if differences:
        raise ValueError(
            f"{run_dir} holds a finished run with other settings ({'; '.join(differences)}); "
            "remove it or use another --output_dir"
        )


def _mean_spread(values: list[float]) -> dict[str, float]:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values)}


def _summarize(runs: dict[Setting, list[Run]]) -> dict:
    rows = []
    for (router_type, experts, granularity), seeded in runs.items():
        metrics = [m for m, _ in seeded]
        row = {"router_type": router_type, "num_experts": None if router_type == "dense" else experts}
        row["granularity"] = None if router_type == "dense" else granularity
        row["seeds"] = [m.seed for m in metrics]
        row["active_parameters"] = metrics[0].active_parameters
        row["total_parameters"] = metrics[0].total_parameters
        losses = {"validation_loss": [m.validation_loss for m in metrics]}
        for domain in ("code", "docs", "math"):
            splits = [m.validation_domains.get(domain) for m in metrics]
            losses[f"validation_{domain}_loss"] = [split.loss if split else None for split in splits]
        for key, values in losses.items():
            if None not in values:
                row[key] = _mean_spread(values)
        if router_type != "dense":
            row["validation_sparsity"] = _mean_spread([m.validation_sparsity for m in metrics])
        row["tokens_per_second"] = _mean_spread([m.tokens_per_second for m in metrics])
        rows.append(row)
    return {"runs": rows}


def _mean_and_spread(values: dict[str, float], count: int) -> str:
    """`mean ± std (n=N)`; with one seed there is no spread to show."""
    if count < 2:
        return f"{values['mean']:.4f} (n=1)"
    return f"{values['mean']:.4f} ± {values['std']:.4f} (n={count})"


def _markdown_table(summary: dict) -> str:
    lines = [
        "| model | E | active / total params | validation loss (mean ± std) | code | docs | math | sparsity | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["runs"]:
        granularity = row.get("granularity") or 1
        model = row["router_type"] + (f" G={granularity}" if granularity > 1 else "")
        loss = row["validation_loss"]
        sparsity = f"{row['validation_sparsity']['mean']:.3f}" if "validation_sparsity" in row else "-"
        domains = [
            f"{row[f'validation_{d}_loss']['mean']:.3f}" if f"validation_{d}_loss" in row else "-"
            for d in ("code", "docs", "math")
        ]
        lines.append(
            f"| {model} | {row['num_experts'] or '-'} | "
            f"{row['active_parameters'] / 1e6:.2f}M / {row['total_parameters'] / 1e6:.2f}M | "
            f"{_mean_and_spread(loss, len(row['seeds']))} | {' | '.join(domains)} | {sparsity} | "
            f"{row['tokens_per_second']['mean']:.0f} |"
        )
    return "\n".join(lines)


def _shade(color: str, index: int, count: int) -> tuple[float, float, float]:
    """The router type's colour, lighter for smaller E: one distinguishable shade per expert count."""
    red, green, blue = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    mix = 0.0 if count < 2 else 0.6 * (count - 1 - index) / (count - 1)
    return tuple(channel + (1 - channel) * mix for channel in (red, green, blue))


def _plot_curves(runs: dict[Setting, list[Run]], path: Path) -> None:
    fig, (loss_axis, sparsity_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    # One shade of the router type's colour per (E, G) setting of that router type.
    variants = {router_type: sorted((e, g) for r, e, g in runs if r == router_type) for router_type, _, _ in runs}
    for (router_type, experts, granularity), seeded in runs.items():
        label = _label(router_type, experts, granularity)
        shades = variants[router_type]
        color = _shade(ROUTER_COLORS[router_type], shades.index((experts, granularity)), len(shades))
        for index, (_, log_history) in enumerate(seeded):
            entries = [entry for entry in log_history if "loss" in entry]
            steps = [entry["step"] for entry in entries]
            loss_axis.plot(
                steps, [e["loss"] for e in entries], color=color, alpha=0.6, label=label if index == 0 else None
            )
            routed = [entry for entry in entries if "remoe/sparsity" in entry]
            if routed:
                sparsity_axis.plot(
                    [e["step"] for e in routed],
                    [e["remoe/sparsity"] for e in routed],
                    color=color,
                    alpha=0.6,
                    label=label if index == 0 else None,
                )
    loss_axis.set(ylabel="training loss", title="Dense vs TopK vs ReMoE (same active parameters and tokens)")
    sparsity_axis.set(xlabel="optimizer step", ylabel="routing sparsity")
    for axis in (loss_axis, sparsity_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_scaling(summary: dict, path: Path, axis_key: str) -> None:
    """Validation loss against `axis_key` ("num_experts" or "granularity"), one line per router type and setting of
    the other key."""
    other_key = "granularity" if axis_key == "num_experts" else "num_experts"
    fig, axis = plt.subplots(figsize=(6, 3.5))
    for router_type in (name for name in ROUTER_TYPES if name != "dense"):
        routed = [r for r in summary["runs"] if r["router_type"] == router_type]
        for other in sorted({r.get(other_key) or 1 for r in routed}):
            rows = sorted((r for r in routed if (r.get(other_key) or 1) == other), key=lambda r: r[axis_key])
            label = (
                router_type
                if len({r.get(other_key) or 1 for r in routed}) == 1
                else f"{router_type} {other_key}={other}"
            )
            axis.errorbar(
                [r[axis_key] for r in rows],
                [r["validation_loss"]["mean"] for r in rows],
                yerr=[r["validation_loss"]["std"] for r in rows],
                marker="o",
                capsize=3,
                color=ROUTER_COLORS[router_type],
                label=label,
            )
    for row in summary["runs"]:
        if row["router_type"] == "dense":
            axis.axhline(row["validation_loss"]["mean"], color=ROUTER_COLORS["dense"], linestyle="--", label="dense")
    axis.set_xscale("log", base=2)
    if axis_key == "num_experts":
        axis.set(xlabel="experts E", ylabel="validation loss", title="Expert-count scaling")
    else:
        axis.set(xlabel="granularity G", ylabel="validation loss", title="Granularity scaling (E*G experts of I/G)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    options = {key: getattr(args, key) for key in ("config", "num_experts_per_tok", "max_steps")}
    compare(
        preset=args.preset,
        router_types=tuple(args.router_types),
        num_experts=tuple(args.num_experts),
        seeds=tuple(args.seeds),
        granularities=tuple(args.granularities),
        output_dir=args.output_dir,
        train_options={key: value for key, value in options.items() if value is not None},
    )
