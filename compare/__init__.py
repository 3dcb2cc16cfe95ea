"""The orchestrator: CLI, worker subprocesses, pandas reports. Never imports a framework."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, said once: not where the help text already gives it, and not for a
    default that means "unset" (None) or a flag (False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.default == []:
            return text
        return super()._get_help_string(action)
