"""Numbers a user sets in the environment (timeouts, waits, cache sizes), read one way: unset or
empty gives the default; anything but a number in range is one line naming the variable and what to
give instead."""

from __future__ import annotations

import os

from gptflow.data.errors import UserError


def number_from_environment(name: str, default: float, wanted: str, *, zero_allowed: bool,
                            error: type[UserError] = UserError) -> float:
    """``$name`` as a number (``default`` when unset), above zero or, if ``zero_allowed``, at
    least zero; ``error`` otherwise, saying that ``wanted`` (e.g. "a number of seconds: give how
    long ..., e.g. 20") is what the variable takes."""
    setting = os.environ.get(name)
    try:
        number = float(setting) if setting else default
    except ValueError:
        number = float("nan")
    if not (number >= 0 if zero_allowed else number > 0):
        raise error(f"{name}={setting} is not {wanted}.")
    return number
