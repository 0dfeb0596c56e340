"""Name -> method tables with typed hyper-parameters: the one mechanism behind
`hfjax.defenses`, `hfjax.attacks`, `hfjax.tasks` and `hfjax.models.adapters`.

A registered method is a factory whose keyword arguments with defaults are its hyper-parameters
(the original authors' values); `parse_hparams(spec, "k=v,k=v")` types a command line's values
like those defaults. Each registry has the same small API:

    registry.register(name, **fields)(factory)     # a decorator; fields describe the method
    registry.get(name) -> spec                      # UnknownName error listing what exists
    registry.available() -> sorted names
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from typing import Any

from hfjax.errors import UserError

RUN_INPUTS = ("total_steps",)
"""Keyword arguments a factory may take that come from the run, not from the user (a training
stage's optimizer steps): never hyper-parameters; passed by `build_for_run`."""


def hyperparameters(factory: Callable) -> dict[str, Any]:
    """The factory's keyword arguments with defaults (run inputs excluded)."""
    return {n: p.default for n, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty and n not in RUN_INPUTS}



class Registry[Spec]:
    """Specs by name; `what` names the kind in messages, `error` is the UserError class raised."""

    def __init__(self, what: str, error: type[UserError]):
        self.what, self.error = what, error
        self._specs: dict[str, Spec] = {}

    def add(self, name: str, spec: Spec) -> Spec:
        if name in self._specs:
            raise self.error(f"{self.what} {name!r} is registered twice")
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> Spec:
        if name not in self._specs:
            raise self.error(f"unknown {self.what} {name!r}; available: {sorted(self._specs)}")
        return self._specs[name]

    def available(self, where: Callable[[Spec], bool] | None = None) -> list[str]:
        return sorted(n for n, s in self._specs.items() if where is None or where(s))


def _coerce(name: str, key: str, text: str, default: Any, error: type[UserError]) -> Any:
    """`text` as the type of the hyper-parameter's default (bool/int/float/str/tuple/None)."""
    text = text.strip()

    def bad(kind: str) -> UserError:
        return error(f"{name}: hyper-parameter {key}={text!r} is not {kind} (default "
                     f"{default!r})")

    if isinstance(default, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("a boolean")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if isinstance(default, str):
        return text
    try:  # None, tuples, lists: a Python literal, else the plain string
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes: 'a=1,b=(1,2)' -> ['a=1', 'b=(1,2)']."""
    parts, depth, cur, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_hparams(name: str, known: dict[str, Any], text: str,
                  error: type[UserError]) -> dict[str, Any]:
    """'rho=2,lam=5' -> {rho: 2.0, lam: 5.0}, typed like the defaults in `known`. Values holding
    commas go in brackets or quotes: 'layers=(1,2)'."""
    out: dict[str, Any] = {}
    for item in split_top_level(text):
        if "=" not in item:
            raise error(f"{name}: hyper-parameter {item!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in known:
            raise error(f"{name} has no hyper-parameter {key!r}; it takes {sorted(known)}")
        if key in out:
            raise error(f"{name}: hyper-parameter {key!r} is given twice")
        out[key] = _coerce(name, key, value, known[key], error)
    return out
