"""Command-line flags that are also environment variables, for both services.

Every ``--some-flag`` of ``squire-orchestrator`` and ``squire-worker`` can be
set as ``SQUIRE_SOME_FLAG``; :class:`EnvHelpFormatter` ends each flag's
``--help`` line with that name, so the help lists them all.
"""

from __future__ import annotations

import argparse


def env_name(flag: str) -> str:
    """``--max-workers`` -> ``SQUIRE_MAX_WORKERS``."""
    return "SQUIRE_" + flag.lstrip("-").replace("-", "_").upper()


class EnvHelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with the environment variable that also sets it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            return text
        return f"{text} [${env_name(flag)}]".lstrip()


def port_number(text: str) -> int:
    """The type of a port flag: 0 to 65535 (what 0 means, the flag says).

    Checked here so that a typo is a usage line, not a traceback from bind().
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a port is a number from 0 to 65535, not {text!r}"
        ) from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {value}")
    return value
