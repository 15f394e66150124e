"""`python -m remoe.training.cli ARGS` is the `remoe ARGS` command line (`remoe_cli`), e.g. under `torchrun`."""

import sys

from remoe_cli import main

if __name__ == "__main__":
    sys.exit(main())
