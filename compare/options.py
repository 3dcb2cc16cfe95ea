"""The training and model options of compare.run, made from the config dataclasses' fields.

A field of common.config.RunConfig or ModelSpec declared with `option(...)` is an option: `--field-name`
(or its `flag`; older spellings stay as aliases), typed by its default, with its choices and help text.
Adding a run or model option is adding such a field; compare.run, the studies (any field) and the docs test
(every option a guide names exists) follow. The options with rules of their own (--seeds, --variants,
--precision/--dtype, --quick) stay in compare.run.
"""

from __future__ import annotations

from dataclasses import MISSING, fields


def option_fields(cls) -> list:
    """The fields of a config dataclass that are options, in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag(f) -> str:
    """The option's flag: its declared one, or --field-name."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def noun(f) -> str:
    """What one item of a list option is called in an error: "norm position" for --norm-positions."""
    return flag(f).lstrip("-").replace("-", " ").removesuffix("s")


def add_options(group, cls, later: dict | None = None) -> None:
    """Add cls's option fields to an argparse group. later: {field: how its default is decided} for the fields
    whose default depends on another option (their argparse default is None)."""
    later = later or {}
    for f in option_fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata["help"] + (f" (default {default}; {later[f.name]})" if f.name in later else "")
        kwargs = {"help": help_text, "dest": f.name}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        elif isinstance(default, tuple):
            kwargs["default"] = ",".join(default)
        else:
            kwargs.update(type=type(default), default=None if f.name in later else default)
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag(f), *f.metadata["aliases"], **kwargs)


def values(args, cls, parse_list) -> dict:
    """{field: value} of cls's option fields from parsed args (a list option through parse_list(text, what,
    choices)); a field left None (its default decided later) is left out."""
    out = {}
    for f in option_fields(cls):
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = parse_list(value, noun(f), f.metadata["choices"])
        if value is not None:
            out[f.name] = value
    return out
