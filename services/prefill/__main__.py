"""`python -m services.prefill`: an instance that starts in the prefill role."""

import sys

from xllm.instance.main import main

sys.exit(main(default_role="prefill"))
