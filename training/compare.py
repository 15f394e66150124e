"""`remoe compare`: dense, TopK, ReMoE and the paper's other baselines (Hash, Expert Choice, SparseMixer-v2, Lory)
with the same active parameters on the same tokens, over several seeds; optionally lm-eval tasks on every run."""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from remoe.configuration_remoe import ROUTER_TYPES
from remoe.records import TrainingMetrics

from .run_config import ROUTER_SPECIFIC_FLAGS, resolve_run
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
# What the sparsity of a router type counts, where it is not "the zero gates of per-token routing" (table notes).
SPARSITY_NOTES = {
    "lory": "lory merges all E experts softly per segment (every gate is nonzero): its sparsity counts the dominant "
    "expert of each merge, so it is 1 - 1/E by construction",
    "expert_choice": "expert_choice is measured at inference, where each token takes its top-k experts (1 - k/E); in "
    "training each expert picks its top-C tokens of the batch, so a token's expert count varies",
}
EVAL_RESULTS_FILE = "compare_eval_results.json"  # lm-eval results of one run, kept in its folder and reused
# Display names of the router types in figure titles.
ROUTER_NAMES = {
    "dense": "Dense",
    "topk": "TopK",
    "relu": "ReMoE",
    "hash": "Hash",
    "expert_choice": "Expert Choice",
    "sparsemixer": "SparseMixer-v2",
    "lory": "Lory",
}
Run = tuple[TrainingMetrics, list[dict], dict | None]  # one seed's metrics.json, log_history.json, eval results
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
    router_options: dict | None = None,
    eval_tasks: tuple[str, ...] | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 8,
) -> dict:
    """Train every (router type, E, G, seed) once (runs with a `metrics.json` are reused) and tabulate the results.

    Several `num_experts` give the expert-count scaling curve, several `granularities` the fine-grained one (the
    paper's G = 1..64 at E = 8: E*G experts of width I/G, TopK routing k*G of them). `router_options` are the router
    knobs (`ROUTER_SPECIFIC_FLAGS`, e.g. `router_segment_length`): each goes to the runs of its router type only, so
    the other runs keep their `run_config.yaml` and are reused. `eval_tasks` (lm-eval task names, e.g. the local
    `remoe_arith remoe_ppl_code remoe_ppl_docs`) run on every run's final model (`eval_limit` documents per task);
    each run's results are kept in its folder (`compare_eval_results.json`) and reused by the next compare."""
    if not seeds or not router_types or not num_experts or not granularities:
        raise ValueError("--seeds, --router_types, --num_experts and --granularities each need at least one value")
    unknown = sorted(set(router_types) - set(ROUTER_TYPES))
    if unknown:
        raise ValueError(f"--router_types must be among {list(ROUTER_TYPES)}, got {unknown}")
    router_options = {name: value for name, value in (router_options or {}).items() if value is not None}
    for name in router_options:
        if name not in ROUTER_SPECIFIC_FLAGS:
            raise ValueError(f"unknown router option {name!r}; router options: {sorted(ROUTER_SPECIFIC_FLAGS)}")
        if ROUTER_SPECIFIC_FLAGS[name] not in router_types:
            raise ValueError(
                f"--{name} applies to {ROUTER_SPECIFIC_FLAGS[name]} runs, and --router_types "
                f"{' '.join(router_types)} has none"
            )
    eval_names = _check_eval_tasks(eval_tasks, eval_limit, eval_batch_size)
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
            options.update(run_router_options(router_type, router_options))
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
        evaluation = _evaluate_run(run_dir, eval_names, eval_limit, eval_batch_size) if eval_names else None
        runs.setdefault(setting, []).append((metrics, log_history, evaluation))
    summary = _summarize(runs)
    if eval_names:
        summary["eval"] = {"tasks": eval_names, "limit": eval_limit, "results_file": EVAL_RESULTS_FILE}
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


def run_router_options(router_type: str, router_options: dict) -> dict:
    """The router knobs that apply to a run of `router_type` (the others' runs do not see them)."""
    return {
        name: value
        for name, value in router_options.items()
        if value is not None and ROUTER_SPECIFIC_FLAGS.get(name) == router_type
    }


def _check_eval_tasks(eval_tasks, limit: int | None, batch_size: int) -> list[str]:
    """The lm-eval task names, checked (known to lm-eval, lm-eval installed) before the first run trains."""
    if eval_tasks is None:
        if limit is not None:
            raise ValueError("--eval_limit applies to --eval_tasks: add the tasks to run")
        return []
    from .evaluation import _split_names, _task_manager

    names = _split_names(list(eval_tasks))
    if not names:
        raise ValueError("--eval_tasks: give at least one task name, e.g. --eval_tasks remoe_arith remoe_ppl_code")
    if limit is not None and limit < 1:
        raise ValueError(f"--eval_limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--eval_batch_size must be >= 1, got {batch_size}")
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError(f"--eval_tasks needs lm-eval: pip install 'remoe[eval]' ({error})") from error
    _task_manager(names, [])
    return names


def _evaluate_run(run_dir: Path, tasks: list[str], limit: int | None, batch_size: int) -> dict:
    """lm-eval `tasks` on the final model of `run_dir`: the results kept in `run_dir/compare_eval_results.json`
    when they are of the same tasks and limit and newer than the model's metrics, else evaluated (and kept)."""
    from remoe.records import read_json_object

    from .evaluation import evaluate_checkpoint

    path = run_dir / EVAL_RESULTS_FILE
    cached = read_json_object(path) if path.is_file() else None
    if (
        cached is not None
        and (cached.get("config") or {}).get("tasks") == tasks
        and (cached.get("config") or {}).get("limit") == limit
        and path.stat().st_mtime >= (run_dir / TrainingMetrics.FILENAME).stat().st_mtime
    ):
        return cached
    return evaluate_checkpoint(run_dir, tasks, limit=limit, batch_size=batch_size, output_path=path, verbose=False)


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
        metrics = [m for m, _, _ in seeded]
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
            if router_type in SPARSITY_NOTES:
                row["sparsity_note"] = SPARSITY_NOTES[router_type]
        row["tokens_per_second"] = _mean_spread([m.tokens_per_second for m in metrics])
        evaluations = [evaluation for _, _, evaluation in seeded]
        if evaluations and None not in evaluations:
            row["eval"] = _eval_summary(evaluations)
        rows.append(row)
    return {"runs": rows}


def _eval_summary(evaluations: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, std, min and max over the seeds of every lm-eval metric (stderrs left out) that every seed has."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    first = evaluations[0].get("results") or {}
    for task, metrics in first.items():
        for metric in metrics:
            if metric.endswith("_stderr"):
                continue
            values = [(evaluation.get("results") or {}).get(task, {}).get(metric) for evaluation in evaluations]
            if all(isinstance(value, (int, float)) for value in values):
                summary.setdefault(task, {})[metric] = _mean_spread([float(value) for value in values])
    return summary


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
        if "sparsity_note" in row:
            sparsity += "*"
        lines.append(
            f"| {model} | {row['num_experts'] or '-'} | "
            f"{row['active_parameters'] / 1e6:.2f}M / {row['total_parameters'] / 1e6:.2f}M | "
            f"{_mean_and_spread(loss, len(row['seeds']))} | {' | '.join(domains)} | {sparsity} | "
            f"{row['tokens_per_second']['mean']:.0f} |"
        )
    notes = {row["router_type"]: row["sparsity_note"] for row in summary["runs"] if "sparsity_note" in row}
    if notes:
        lines.append("")
        lines += [f"\\* {note}." for note in notes.values()]
    columns = _eval_columns(summary)
    if columns:
        lines += ["", _eval_table(summary, columns)]
    return "\n".join(lines)


def _eval_columns(summary: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs of the lm-eval table, in the order the runs have them."""
    columns: list[tuple[str, str]] = []
    for row in summary["runs"]:
        for task, metrics in row.get("eval", {}).items():
            columns += [(task, metric) for metric in metrics if (task, metric) not in columns]
    return columns


def _eval_table(summary: dict, columns: list[tuple[str, str]]) -> str:
    """The lm-eval metrics of every setting, mean ± std over its seeds."""
    eval_settings = summary.get("eval") or {}
    limit = eval_settings.get("limit")
    caption = "lm-eval (mean ± std over seeds" + (f"; first {limit} documents per task" if limit else "") + "):"
    lines = [
        caption,
        "",
        "| model | E | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in summary["runs"]:
        granularity = row.get("granularity") or 1
        model = row["router_type"] + (f" G={granularity}" if granularity > 1 else "")
        cells = []
        for task, metric in columns:
            values = row.get("eval", {}).get(task, {}).get(metric)
            cells.append("-" if values is None else _eval_cell(values, len(row["seeds"])))
        lines.append(f"| {model} | {row['num_experts'] or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _eval_cell(values: dict[str, float], count: int) -> str:
    """`mean ± std (n=N)` with 4 decimals, or 4 significant digits for large values (word perplexities)."""

    def number(value: float) -> str:
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"

    if count < 2:
        return f"{number(values['mean'])} (n=1)"
    return f"{number(values['mean'])} ± {number(values['std'])} (n={count})"


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
        for index, (_, log_history, _) in enumerate(seeded):
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
    names = list(dict.fromkeys(router_type for router_type, _, _ in runs))
    title = " vs ".join(ROUTER_NAMES.get(name, name) for name in names)
    title = textwrap.fill(title, width=70) + "\n(same active parameters and tokens)"
    loss_axis.set(ylabel="training loss", title=title)
    ylabel = "routing sparsity" + (" (lory: dominant expert)" if "lory" in names else "")
    sparsity_axis.set(xlabel="optimizer step", ylabel=ylabel)
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
        router_options={name: getattr(args, name, None) for name in ROUTER_SPECIFIC_FLAGS},
        eval_tasks=tuple(args.eval_tasks) if getattr(args, "eval_tasks", None) else None,
        eval_limit=getattr(args, "eval_limit", None),
        eval_batch_size=getattr(args, "eval_batch_size", 8),
        preset=args.preset,
        router_types=tuple(args.router_types),
        num_experts=tuple(args.num_experts),
        seeds=tuple(args.seeds),
        granularities=tuple(args.granularities),
        output_dir=args.output_dir,
        train_options={key: value for key, value in options.items() if value is not None},
    )
