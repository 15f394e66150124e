"""Training curves: loss (and its LM and regulariser terms), sparsity against its target, and lambda, with ReMoE's
three stages shaded."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STAGE_COLORS = ("#f2d7d5", "#fdebd0", "#d5f5e3")
STAGE_II_RISE = 0.1  # stage II: sparsity has climbed 10% of the way from its running minimum to the target
# Stage III band around the target. The paper's settled sparsity stays within about +-0.006 (512 x 1024 tokens a step);
# the tiny preset's (16 x 128 tokens) wanders by about +-0.02. Stage II ends steeply, so a band this wide moves the
# stage III boundary by a few steps only, where a narrow one would miss stage III of a small run altogether.
STAGE_III_TOLERANCE = 0.03


def training_stages(
    steps: list[int], sparsity: list[float], target: float, tolerance: float = STAGE_III_TOLERANCE
) -> list[int]:
    """Steps where ReMoE's stages II and III begin (paper, Sec. 3.5); missing stages are left out.

    Stage I is near-dense: sparsity falls from its initial value to its running minimum. Stage II (sparsifying) starts
    at the first step where sparsity has risen above that running minimum by 10% of `target - minimum` (at once when
    the minimum is already at or above the target). Stage III (stable) starts at the first step after that from which
    sparsity stays within `tolerance` of the target up to the last step."""
    if len(steps) != len(sparsity):
        raise ValueError(f"steps and sparsity differ in length: {len(steps)} and {len(sparsity)}")
    stage_two = None
    minimum = float("inf")
    for index, value in enumerate(sparsity):
        minimum = min(minimum, value)
        if value - minimum >= STAGE_II_RISE * (target - minimum):
            stage_two = index
            break
    if stage_two is None:
        return []
    stage_three = None
    for index in range(len(sparsity) - 1, stage_two - 1, -1):  # the longest tail within the tolerance
        if abs(sparsity[index] - target) > tolerance:
            break
        stage_three = index
    return [steps[stage_two]] + ([steps[stage_three]] if stage_three is not None else [])


def plot_training_curves(log_history: list[dict], config, path: str | Path) -> Path:
    """Write loss, sparsity and lambda against step (from `Trainer.state.log_history`) to a PNG.

    When the log has `remoe/loss_lm` and `remoe/loss_reg` (the LM loss and the weighted regulariser: `lambda * L_reg`
    for ReLU routing, the balancing term for TopK and SparseMixer-v2), the LM loss is drawn next to the total loss and
    the regulariser gets a panel of its own (log scale), as in the paper's Fig. 4. Routers trained without a
    regulariser (Hash, Expert Choice, Lory: their logged term is 0) get no such panel. The sparsity panel marks
    ReMoE's target `1 - k/E`; for the other routers the same line is the sparsity of k experts per token (for Lory,
    whose merge uses every expert, the statistics count the dominant one)."""
    rows = [entry for entry in log_history if "loss" in entry]
    steps = [entry["step"] for entry in rows]
    routed = [entry for entry in rows if "remoe/sparsity" in entry]
    has_regularizer = config.uses_l1_controller or config.uses_balancing_loss
    terms = [entry for entry in rows if "remoe/loss_lm" in entry and "remoe/loss_reg" in entry and has_regularizer]
    names = ["loss", *(["regularizer"] if terms else []), *(["sparsity"] if routed else [])]
    if config.uses_l1_controller and routed:
        names.append("lambda")
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    panel = dict(zip(names, axes, strict=True))

    panel["loss"].plot(steps, [entry["loss"] for entry in rows], color="#1f77b4", label="training loss")
    panel["loss"].set_ylabel("training loss")
    title = (
        f"{config.router_type} router, E={config.num_experts}, k={config.num_experts_per_tok}, G={config.granularity}"
    )
    if config.has_experts and not has_regularizer:
        title += " (no regulariser)"
    panel["loss"].set_title(title, pad=16)
    if terms:
        term_steps = [entry["step"] for entry in terms]
        regularizer = "λ·L_reg" if config.uses_l1_controller else "balancing loss term"
        panel["loss"].plot(
            term_steps, [entry["remoe/loss_lm"] for entry in terms], color="#ff7f0e", linestyle="--", label="L_lm"
        )
        panel["loss"].legend(loc="upper right", fontsize=8)
        values = [entry["remoe/loss_reg"] for entry in terms]
        axis = panel["regularizer"]
        axis.plot(term_steps, values, color="#9467bd", label=regularizer)
        if all(value > 0 for value in values):
            axis.set_yscale("log")
        axis.set_ylabel(regularizer)
        axis.legend(loc="upper right", fontsize=8)
    if routed:
        route_steps = [entry["step"] for entry in routed]
        sparsity = [entry["remoe/sparsity"] for entry in routed]
        axis = panel["sparsity"]
        axis.plot(route_steps, sparsity, color="#2ca02c", label="sparsity")
        reference = "target 1 - k/E" if config.uses_l1_controller else "1 - k/E (k experts per token)"
        axis.axhline(config.target_sparsity, color="black", linestyle="--", linewidth=1, label=reference)
        axis.set_ylabel("sparsity" if config.router_type != "lory" else "sparsity (dominant expert)")
        axis.legend(loc="lower right")
    if config.uses_l1_controller and routed:
        panel["lambda"].semilogy(route_steps, [entry["remoe/l1_coef"] for entry in routed], color="#d62728")
        panel["lambda"].set_ylabel("L1 coefficient λ")
        edges = [route_steps[0], *training_stages(route_steps, sparsity, config.target_sparsity), route_steps[-1]]
        for index, (left, right) in enumerate(pairwise(edges)):
            if right <= left:
                continue
            for axis in axes:
                axis.axvspan(left, right, color=STAGE_COLORS[index], alpha=0.6, linewidth=0)
            panel["loss"].text(
                (left + right) / 2,
                1.0,
                f"stage {'I' * (index + 1)}",
                transform=panel["loss"].get_xaxis_transform(),
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
