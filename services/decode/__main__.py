"""`python -m services.decode`: an instance that starts in the decode role
(`--role both` for a PD-colocated instance)."""

import sys

from xllm.instance.main import main

sys.exit(main(default_role="decode"))
