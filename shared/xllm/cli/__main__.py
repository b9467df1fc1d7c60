"""`python -m xllm.cli`: the `xllm` command without its console script."""

import sys

from xllm.cli import main

sys.exit(main())
