"""The checkout itself: a Python started at its top (`python -m pytest`, a notebook, `python -c`) has the checkout's
folders on `sys.path`, so none of them may carry the import name of an installed package."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _top_level_packages() -> list[str]:
    return sorted(path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file())


def test_no_folder_of_the_checkout_hides_an_installed_package():
    installed = importlib.metadata.packages_distributions()
    clashes = {
        name: installed[name]
        for name in _top_level_packages()
        if name in installed and set(installed[name]) != {"remoe"}
    }
    assert not clashes, f"folders of the checkout named like installed packages (rename them): {clashes}"
    assert "remoe_kernels" in _top_level_packages()  # the kernels folder is not called `kernels` (a PyPI package)


def test_transformers_and_remoe_import_from_the_top_of_the_checkout():
    """Transformers 5.25 imports the PyPI package `kernels` from its MoE integration; a `kernels/` folder here shadowed
    it and `import remoe` failed for every Python started in the checkout."""
    script = (
        "import sys; import transformers.integrations.moe, remoe, remoe.kernels; "
        "assert sys.path[0] == '', sys.path[0]; "
        "assert 'remoe_kernels' in remoe.kernels.__file__, remoe.kernels.__file__; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
