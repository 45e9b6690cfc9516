"""The ``critical-tokens`` command: one subcommand per pipeline stage.

Each subcommand is a frozen ``...Config`` (its options) and a function, in the module named for the
command (``pretrain.py``, ``evaluate.py``, ``reproduce.py``, ``critical/criteria.py``,
``critical/inspect.py``) or, for a package's own command, in its ``command.py`` (``critical/``,
``report/``); `_commands` lists them all.
"""

from __future__ import annotations

import argparse
import sys

from .config import add_arguments, from_namespace
from .runs import USER_OS_ERRORS, UserError, no_half_made_run

DESCRIPTION = "RL fine-tuning with a prioritized KL penalty, and the study of critical tokens: one command per stage."
EPILOG = "Each command has its own help: critical-tokens COMMAND --help."


def _commands():
    from .critical.command import CriticalConfig, critical
    from .critical.criteria import CriteriaConfig, criteria
    from .critical.inspect import InspectConfig, inspect
    from .evaluate import EvaluateConfig, evaluate
    from .pretrain import PretrainConfig, pretrain
    from .report import ReportConfig, report
    from .reproduce import ReproduceConfig, reproduce
    from .rl.loop import train
    from .rl.config import RLConfig

    return {
        "pretrain": (PretrainConfig, pretrain, "pre-train a GPT-2 on scratchpad addition of 1..N digits"),
        "evaluate": (EvaluateConfig, evaluate, "accuracy on identical and varying digits for N..N+3 (tables 4 and 5)"),
        "critical": (CriticalConfig, critical, "critical tokens: certainty gap (table 1), where failures start, discovery, pictures"),
        "rl": (RLConfig, train, "RL fine-tuning (A2C, PPO, GRPO or RLOO) with no, the standard, or the prioritized KL penalty"),
        "reproduce": (ReproduceConfig, reproduce, "reproduce the paper's experiments from a preset (reproduce --help lists them): runs, plots, REPORT.md"),
        "report": (ReportConfig, report, "rebuild REPORT.md, summary.json and plots/ of a reproduction from its files"),
        "criteria": (CriteriaConfig, criteria, "which criterion (certainty, entropy, covariance) best separates the critical tokens on a model's own N+1 rollouts"),
        "inspect": (InspectConfig, inspect, "before RL: which tokens of a Hugging Face causal LM, on your prompts, the prioritized KL penalty would free, and what beta means"),
    }


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would drown our own progress bars
    commands = _commands()
    parser = argparse.ArgumentParser(prog="critical-tokens", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_class, _, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, config_class)
    ns = parser.parse_args(argv)
    config_class, run, _ = commands[ns.command]
    try:
        config = from_namespace(config_class, ns)
        with no_half_made_run(config):
            run(config)
    except UserError as e:
        print(f"critical-tokens {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the user's to fix (a full disk, no permission): one line; any other is a bug, with its traceback
        if e.errno not in USER_OS_ERRORS:
            raise
        print(f"critical-tokens {ns.command}: error: {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"critical-tokens {ns.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
