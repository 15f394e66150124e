"""Test hooks for CLI runs under torchrun: put this folder on PYTHONPATH and Python imports it at start-up.

- DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes on a clean 2-core machine);
  the tests run plain gloo collectives instead, which is what that op accelerates.
- `REMOE_TEST_KILL_AT_SAVE=N` (with `REMOE_TEST_KILL_RANK=R`, default 1) SIGKILLs rank R in the middle of writing
  checkpoint-N: after the model and DeepSpeed's state, before its RNG state and the Trainer state. A crash while saving.
"""

import contextlib
import importlib
import os
import signal

if os.environ.get("RANK") is not None:
    # The module itself: the attribute `deepspeed.comm.torch` is the `torch` module that `deepspeed.comm` imports.
    with contextlib.suppress(ImportError):
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    _kill_at = int(os.environ.get("REMOE_TEST_KILL_AT_SAVE", "0"))
    if _kill_at and os.environ["RANK"] == os.environ.get("REMOE_TEST_KILL_RANK", "1"):
        from transformers import Trainer

        _save_rng_state = Trainer._save_rng_state

        def _kill_while_saving(self, output_dir):
            if self.state.global_step == _kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _save_rng_state(self, output_dir)

        Trainer._save_rng_state = _kill_while_saving
