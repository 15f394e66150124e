"""Training, data and analysis for ReMoE models, and the `remoe` commands.

A `remoe train` run flows one way through one file per stage, `train.py` calling each in turn:

- `run_config.py`: the run configuration, every check before any work (`plan_run` -> `RunConfig`), with the parallel
  layout checks of `distributed.py` (DeepSpeed config, batch sizes, expert-parallel size);
- `data.py`: the data (embedded corpus, local / Hub / streaming datasets, tokenizer, packing: `prepare_data`);
- `trainer.py`: the Trainer with its complete-or-ignored checkpoints and atomic final save, and with
  `expert_parallel.py` (experts sharded over DeepSpeed's expert-parallel groups) when asked;
- `controller.py`: the callback that runs the L1 controller once per optimizer step;
- `routing.py` and `plots.py`: the final routing metrics and `training_curves.png`.

The other commands: `compare.py`, `btx.py` (branch, mix, finetune, eval), `convert.py` (upcycle, convert),
`evaluation.py` (lm-eval), `analysis.py` (routing analysis), `generate.py`; `metrics.py` holds `evaluate` metrics for
`Trainer`. The command line itself is `remoe_cli.py` (installed as the top-level module `remoe_cli`, `cli.py` is its
`python -m` entry point).
"""

from .controller import ReMoEControllerCallback, add_controller_callback

__all__ = ["ReMoEControllerCallback", "add_controller_callback"]
