"""Errors a user can act on.

Every failure caused by input (files, options, banks) raises `InputError`; the
CLI prints its one line and exits 2. Anything else is a bug or an environment
failure and exits 1. Messages name the file / field / entry and say how to fix.
"""

from __future__ import annotations


class LorablendError(Exception):
    """Base class: a failure with a one-line, actionable message."""

    exit_code = 1


class InputError(LorablendError):
    """Bad input or usage: the user can fix it by changing a file or an option."""

    exit_code = 2


class NoGain(LorablendError):
    """`--require-gain`: validation found no adapter better than the base model, so nothing was written."""

    exit_code = 3


def suggest(value: str, choices: list[str] | tuple[str, ...], what: str) -> InputError:
    """An InputError for an unknown name that lists the valid ones."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"unknown {what} '{value}'{hint}; choose one of: {', '.join(choices)}")
