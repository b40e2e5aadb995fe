"""Option checks for everything a config builds, mechanisms and tasks alike: one error type and one
message that names the option, its bad value, what it must be, and the config file to fix.

train.py prints an OptionError as one block without a traceback.
"""

from __future__ import annotations


class OptionError(ValueError):
    """A config option with a bad value."""


def option_error(group: str, name: str, field: str, value, expected: str) -> OptionError:
    """e.g. ``cast attention: clustering='x' must be one of (...); set attention.clustering in
    configs/attention/cast.yaml or on the command line``."""
    return OptionError(f"{name} {group}: {field}={value!r} must be {expected}; set {group}.{field} in "
                       f"configs/{group}/{name}.yaml or on the command line")


def require_positive(group: str, name: str, **options: int) -> None:
    """Refuse any option that is not a positive integer."""
    for field, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise option_error(group, name, field, value, "a positive integer")


def require_choice(group: str, name: str, field: str, value, choices: tuple):
    """Refuse a value outside ``choices``; returns the value."""
    if value not in choices:
        raise option_error(group, name, field, value, f"one of {tuple(choices)}")
    return value
