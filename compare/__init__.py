"""The orchestrator: CLI, worker subprocesses, pandas reports. Never imports a framework."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, said once: not where the help text already gives it, not for a
    default that means "unset" (None), and not for a flag (its name says what it turns on or off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is argparse.SUPPRESS or action.default == []
        if unset or action.nargs == 0 or "default" in text:  # nargs 0: a flag, on or off by its name
            return text
        return super()._get_help_string(action)
