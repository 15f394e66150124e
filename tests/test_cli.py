"""The `remoe` command line itself: parsing imports nothing heavy, argument errors are one line, choices agree."""

import subprocess
import sys

import pytest
import remoe_cli

from remoe.configuration import available_presets
from remoe.configuration_remoe import AUX_LOSS_REDUCTIONS, LOAD_BALANCE_TYPES, ROUTER_TYPES
from remoe.conversion import MIX_ROUTER_TYPES, ROUTER_INITS, SHARED_MODES, UPCYCLE_MODES
from remoe.training.generate import DTYPES


def test_the_command_line_vocabularies_are_the_projects():
    assert remoe_cli.ROUTER_TYPES == ROUTER_TYPES
    assert remoe_cli.LOAD_BALANCE_TYPES == LOAD_BALANCE_TYPES
    assert remoe_cli.AUX_LOSS_REDUCTIONS == AUX_LOSS_REDUCTIONS
    assert remoe_cli.MIX_ROUTER_TYPES == MIX_ROUTER_TYPES
    assert remoe_cli.SHARED_MODES == SHARED_MODES
    assert remoe_cli.ROUTER_INITS == ROUTER_INITS
    assert remoe_cli.UPCYCLE_MODES == UPCYCLE_MODES
    assert remoe_cli.DTYPES == DTYPES
    assert set(remoe_cli.PRESETS) == set(available_presets())


def test_parsing_every_command_imports_neither_torch_nor_the_model():
    """What keeps `remoe --help` and argument errors fast (the README gives the times): no torch, no transformers."""
    script = (
        "import sys, remoe_cli\n"
        "parser = remoe_cli.build_parser()\n"
        "for argv in (['train', '--max_steps', '3'], ['generate', 'm', '--prompt', 'x'], ['btx', 'eval', 'a']):\n"
        "    parser.parse_args(argv)\n"
        "heavy = sorted(name for name in ('torch', 'transformers', 'remoe') if name in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--max_steps", "five"], "--max_steps: must be an integer >= 1, got 'five'"),
        (["train", "--router_type", "sparse"], "--router_type: invalid choice: 'sparse'"),
        (["analyze", "model", "--output_dir", "out", "--batch_size", "0"], "--batch_size: must be an integer >= 1"),
        (["analyze", "model", "--output_dir", "out", "--max_blocks_per_domain", "0"], "--max_blocks_per_domain"),
        (["trian"], "invalid choice: 'trian'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    assert remoe_cli.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and error[0].startswith("remoe")


def test_help_exits_cleanly(capsys):
    assert remoe_cli.main(["--help"]) == 0
    assert "remoe" in capsys.readouterr().out
