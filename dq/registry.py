"""A tiny name -> object registry used by every family (formats, recipes, kernels, cache methods, metrics)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from dq.errors import DQError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to members; an unknown name raises a DQError that lists the registered ones."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._members: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._members:
            raise DQError(f"{self.family} {name!r} is registered twice; pick another name.")
        self._members[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            raise DQError(
                f"unknown {self.family} {name!r}; registered: {', '.join(sorted(self._members))}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
