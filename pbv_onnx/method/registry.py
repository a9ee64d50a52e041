"""Name -> instance registries: the decorator that cotangent rules and attribution paths register with."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict, what: str) -> Callable[[str], Callable[[T], T]]:
    """`register(name)`: a class decorator that sets `cls.name` and puts one instance in `table`.

    Names are unique and never hold "+", which joins a rule and a path in method labels.
    """

    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in table or "+" in name:
                raise ValueError(f"cannot register {what} {name!r}")
            cls.name = name
            table[name] = cls()
            return cls

        return add

    return register
