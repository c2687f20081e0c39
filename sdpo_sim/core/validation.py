"""The checks every settings dataclass uses (``MethodConfig``, the toy world's ``RunConfig``, the recipe sections).

Each refuses a bad value with a one-line ``ValueError`` ``"{owner}.{name}={value!r} <rule>"``: the field, the bad value
and what is allowed (the command lines turn it into exit code 2). ``owner`` is whatever names the field's home, e.g.
``"MethodConfig"``, ``"RunConfig"`` or ``"recipe field training"``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NoReturn


def fail(owner: str, name: str, value: Any, rule: str) -> NoReturn:
    """Raise ``ValueError("{owner}.{name}={value!r} {rule}")``."""
    raise ValueError(f"{owner}.{name}={value!r} {rule}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer and not a bool (``True`` is an ``int`` to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(owner: str, name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 why: str = "") -> None:
    """Refuse anything but a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), naming
    ``owner.name``, the allowed range and (``why``) where the bound comes from."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        fail(owner, name, value, f"must be a number in {lo_s}, {hi}]" + (f" ({why})" if why else ""))


def check_int(owner: str, name: str, value: Any, lo: int = 0, *, optional: bool = False, why: str = "", rule: str = "") -> None:
    """Refuse anything but an integer ``≥ lo`` (or ``None`` with ``optional``). The message says
    ``must be an integer ≥ lo`` (``or null`` when optional, then ``why`` in brackets), or ``rule`` when given."""
    if (value is None and optional) or (is_int(value) and value >= lo):
        return
    default = f"must be an integer ≥ {lo}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    fail(owner, name, value, rule or default)


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Refuse a value that is not one of ``allowed``, listing them (``1`` is not ``True`` here)."""
    allowed = tuple(allowed)
    if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in allowed):
        fail(owner, name, value, f"is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_bool(owner: str, name: str, value: Any) -> None:
    """Refuse anything but ``True`` or ``False`` (``1`` and ``"yes"`` are not booleans)."""
    if not isinstance(value, bool):
        fail(owner, name, value, "must be true or false")


def check_str(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    """Refuse anything but a non-empty string (or ``None`` with ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        fail(owner, name, value, "must be a non-empty string")
