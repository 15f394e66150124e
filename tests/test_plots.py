"""ReMoE's three training stages found in a sparsity curve, and the training-curve figure with the two loss terms."""

import pytest

from remoe.training import plots
from remoe.training.plots import training_stages

from .conftest import tiny_config

TARGET = 0.875


def _paper_like_curve() -> tuple[list[int], list[float]]:
    """0.5 falling to 0.01 by step 20 (stage I), flat to 40, rising linearly to the target at 115, then +-0.005."""
    steps = list(range(301))
    sparsity = []
    for step in steps:
        if step <= 20:
            sparsity.append(0.5 - step * 0.0245)
        elif step <= 40:
            sparsity.append(0.01)
        elif step <= 115:
            sparsity.append(0.01 + (step - 40) * (TARGET - 0.01) / 75)
        else:
            sparsity.append(TARGET + (0.005 if step % 2 else -0.005))
    return steps, sparsity


def test_stage_two_starts_where_sparsity_leaves_its_running_minimum():
    steps, sparsity = _paper_like_curve()
    # 10% of (0.875 - 0.01) above the minimum 0.01 is 0.0965, first reached at step 40 + 7.5 -> 48 (the old rule,
    # 10% of the way from the first value 0.5, fired at step 87); within 0.01 of the target from step 115 on, within
    # the default 0.03 from 40 + 72.4 -> 113.
    assert training_stages(steps, sparsity, TARGET, tolerance=0.01) == [48, 115]
    assert training_stages(steps, sparsity, TARGET) == [48, 113]


def test_stage_three_needs_the_sparsity_to_stay_near_the_target():
    steps, sparsity = _paper_like_curve()
    sparsity[200] = TARGET - 0.05  # one excursion: stage III is the stable tail after it
    assert training_stages(steps, sparsity, TARGET) == [48, 201]
    sparsity[300] = TARGET + 0.05  # never settles: stage III is missing
    assert training_stages(steps, sparsity, TARGET) == [48]


def test_stages_of_a_tiny_preset_run():
    """The logged sparsity (every 5 steps) of `remoe train` with the tiny preset: a shallow dip, then +-0.02."""
    sparsity = [0.4761, 0.3249, 0.3317, 0.5679, 0.6115, 0.6013, 0.6199, 0.6548, 0.6863, 0.702, 0.6882, 0.6807]
    sparsity += [0.6846, 0.7122, 0.7458, 0.7698, 0.8045, 0.8293, 0.8784, 0.8854, 0.8844, 0.8604, 0.8807, 0.8854]
    sparsity += [0.8673, 0.8743, 0.8877, 0.874, 0.871, 0.8726, 0.8683, 0.8943, 0.8964, 0.8914, 0.8851, 0.8826]
    steps = list(range(5, 5 * len(sparsity) + 1, 5))
    assert training_stages(steps, sparsity, TARGET) == [20, 95]
    assert training_stages(steps, sparsity, TARGET, tolerance=0.01) == [20, 180]  # the paper's band: the last point


def test_stages_of_curves_without_a_dip_or_a_rise():
    assert training_stages([0, 1, 2, 3], [0.5, 0.4, 0.3, 0.2], TARGET) == []  # still falling: stage I only
    assert training_stages([0, 5, 10], [0.5, 0.6, 0.7], TARGET) == [5]  # rising from the start
    assert training_stages([0, 5, 10], [0.95, 0.9, 0.876], TARGET) == [0, 5]  # above the target from the start
    assert training_stages([], [], TARGET) == []
    with pytest.raises(ValueError, match="length"):
        training_stages([0, 1], [0.5], TARGET)


def _log_history(with_terms: bool) -> list[dict]:
    steps, sparsity = _paper_like_curve()
    history = []
    for step, value in zip(steps[5::5], sparsity[5::5], strict=True):
        entry = {"step": step, "loss": 8.0 - step / 100, "remoe/sparsity": value, "remoe/l1_coef": 1e-8 * 1.2**step}
        if with_terms:
            entry["remoe/loss_lm"] = entry["loss"] - 0.01
            entry["remoe/loss_reg"] = 0.01
        history.append(entry)
    history.append({"step": 300, "train_loss": 6.0})  # the Trainer's closing entry has no `loss`
    return history


@pytest.fixture
def figures(monkeypatch):
    """The figures `plot_training_curves` closes, kept open for the test."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plots.plt.close(fig)


@pytest.mark.parametrize("router_type", ["relu", "topk"])
def test_training_curves_draw_the_lm_and_regularizer_terms_apart(tmp_path, figures, router_type):
    config = tiny_config(router_type=router_type, num_experts=8)  # target 0.875
    history = _log_history(with_terms=True)
    plots.plot_training_curves(history, config, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    axes = figures[0].axes
    labels = [axis.get_ylabel() for axis in axes]
    regularizer = "λ·L_reg" if router_type == "relu" else "balancing loss term"
    expected = ["training loss", regularizer, "sparsity", *(["L1 coefficient λ"] if router_type == "relu" else [])]
    assert labels == expected
    lm_line = next(line for line in axes[0].get_lines() if line.get_label() == "L_lm")
    assert list(lm_line.get_ydata()) == [entry["remoe/loss_lm"] for entry in history if "loss" in entry]
    assert list(axes[1].get_lines()[0].get_ydata()) == [0.01] * 60
    assert axes[1].get_yscale() == "log"


def test_training_curves_without_the_loss_terms_keep_todays_panels(tmp_path, figures):
    plots.plot_training_curves(_log_history(with_terms=False), tiny_config(num_experts=8), tmp_path / "curves.png")
    axes = figures[0].axes
    assert [axis.get_ylabel() for axis in axes] == ["training loss", "sparsity", "L1 coefficient λ"]
    stage_labels = [text.get_text() for text in axes[0].texts]
    assert stage_labels == ["stage I", "stage II", "stage III"]
    spans = [patch.get_x() for patch in axes[0].patches]  # logged every 5 steps: the stages start at 5, 50 and 115
    assert spans == [5, 50, 115]
