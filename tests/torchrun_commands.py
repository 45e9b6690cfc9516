"""Run by torchrun in the tests: several critical-tokens commands in one process group, so that the
ranks start (and import torch) once: ``torchrun ... tests/torchrun_commands.py '[["pretrain", ...], ["rl", ...]]'``."""

import json
import sys

from critical_tokens import cli

for argv in json.loads(sys.argv[1]):
    code = cli.main(argv)
    if code:
        sys.exit(code)
