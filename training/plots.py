"""Training curves: loss, sparsity against its target, and lambda, with ReMoE's three stages shaded."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STAGE_COLORS = ("#f2d7d5", "#fdebd0", "#d5f5e3")


def training_stages(steps: list[int], sparsity: list[float], target: float, tolerance: float = 0.01) -> list[int]:
    """Steps where stages II and III begin: II when sparsity has moved 10% of the way from its start to the target,
    III when it first comes within `tolerance` of the target. Missing stages are left out."""
    if not sparsity:
        return []
    start = sparsity[0]
    boundaries = []
    for step, value in zip(steps, sparsity, strict=True):
        if not boundaries and (value - start) >= 0.1 * (target - start):
            boundaries.append(step)
        if boundaries and abs(value - target) <= tolerance:
            boundaries.append(step)
            break
    return boundaries


def plot_training_curves(log_history: list[dict], config, path: str | Path) -> Path:
    """Write loss, sparsity and lambda against step (from `Trainer.state.log_history`) to a PNG."""
    rows = [entry for entry in log_history if "loss" in entry]
    steps = [entry["step"] for entry in rows]
    routed = [entry for entry in rows if "remoe/sparsity" in entry]
    panels = 3 if config.uses_l1_controller else (2 if routed else 1)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True, squeeze=False)
    axes = axes[:, 0]

    axes[0].plot(steps, [entry["loss"] for entry in rows], color="#1f77b4")
    axes[0].set_ylabel("training loss")
    axes[0].set_title(
        f"{config.router_type} router, E={config.num_experts}, k={config.num_experts_per_tok}, G={config.granularity}",
        pad=16,
    )
    if routed:
        route_steps = [entry["step"] for entry in routed]
        sparsity = [entry["remoe/sparsity"] for entry in routed]
        axes[1].plot(route_steps, sparsity, color="#2ca02c", label="sparsity")
        axes[1].axhline(config.target_sparsity, color="black", linestyle="--", linewidth=1, label="target 1 - k/E")
        axes[1].set_ylabel("sparsity")
        axes[1].legend(loc="lower right")
    if config.uses_l1_controller and routed:
        axes[2].semilogy(route_steps, [entry["remoe/l1_coef"] for entry in routed], color="#d62728")
        axes[2].set_ylabel("L1 coefficient λ")
        edges = [route_steps[0], *training_stages(route_steps, sparsity, config.target_sparsity), route_steps[-1]]
        for index, (left, right) in enumerate(pairwise(edges)):
            for axis in axes:
                axis.axvspan(left, right, color=STAGE_COLORS[index], alpha=0.6, linewidth=0)
            axes[0].text(
                (left + right) / 2,
                1.0,
                f"stage {'I' * (index + 1)}",
                transform=axes[0].get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
