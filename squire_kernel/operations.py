"""Operations and monoids, declared with decorators in the user's own module.

    from squire import operation, monoid

    @operation("fib_at")
    def fib_at(n: int) -> int: ...

    @operation("multiply_by")
    def multiply_by(x: int, *, factor: int) -> int:   # parameters are keywords
        return x * factor

    @monoid("sum", empty=0)
    def add(a: int, b: int) -> int:
        return a + b

A worker started with ``--ops package.module`` (or ``--ops ./my_ops.py``)
offers every Operation and Monoid object found in that module's namespace.
An operation that declares an ``abort`` keyword receives an
:class:`AbortSignal` it may poll to stop early.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


class AbortSignal(Protocol):
    """Cooperative cancellation: true once the task's directive was aborted."""

    def is_set(self) -> bool: ...


def _accepts_abort(fn: Callable[..., Any]) -> bool:
    try:
        return "abort" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Operation:
    """A named computation input -> output, with optional keyword parameters."""

    name: str
    fn: Callable[..., Any]
    accepts_abort: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_NO_EMPTY = object()


@dataclass(frozen=True)
class Monoid:
    """An associative ``combine(a, b)`` with an identity ``empty()``.

    ``empty`` is a value or a callable taking the monoid's parameters.
    Combine need not be commutative: Squire only combines contiguous ranges,
    left before right.
    """

    name: str
    combine: Callable[..., Any]
    empty: Any = field(default=_NO_EMPTY)

    def empty_value(self, **params: Any) -> Any:
        if callable(self.empty):
            return self.empty(**params)
        return self.empty

    def combine_all(self, values: list[Any], **params: Any) -> Any:
        """Left fold of ``values``; no values gives empty()."""
        if not values:
            return self.empty_value(**params)
        acc = values[0]
        for value in values[1:]:
            acc = self.combine(acc, value, **params)
        return acc


def operation(name: str) -> Callable[[Callable[..., Any]], Operation]:
    """Declare ``fn`` as the operation ``name``."""
    _check_name(name)

    def wrap(fn: Callable[..., Any]) -> Operation:
        return Operation(name=name, fn=fn, accepts_abort=_accepts_abort(fn))

    return wrap


def monoid(name: str, *, empty: Any) -> Callable[[Callable[..., Any]], Monoid]:
    """Declare ``combine`` as the monoid ``name`` with identity ``empty``."""
    _check_name(name)

    def wrap(combine: Callable[..., Any]) -> Monoid:
        return Monoid(name=name, combine=combine, empty=empty)

    return wrap


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"an operation name must be a non-empty string, got {name!r}")


@dataclass
class Registry:
    """The operations and monoids a worker offers, by name."""

    operations: dict[str, Operation] = field(default_factory=dict)
    monoids: dict[str, Monoid] = field(default_factory=dict)

    def add(self, item: Operation | Monoid) -> None:
        table: dict[str, Any] = self.operations if isinstance(item, Operation) else self.monoids
        existing = table.get(item.name)
        if existing is not None and existing is not item:
            raise ValueError(f"{item.name!r} is registered twice")
        table[item.name] = item

    def add_module(self, module: ModuleType) -> None:
        for value in vars(module).values():
            if isinstance(value, Operation | Monoid):
                self.add(value)

    @classmethod
    def from_modules(cls, names: Iterable[str]) -> Registry:
        """Import each module by dotted name and collect what it declares."""
        registry = cls()
        for name in names:
            registry.add_module(import_ops_module(name))
        return registry

    def __bool__(self) -> bool:
        return bool(self.operations or self.monoids)


def import_ops_module(spec: str) -> ModuleType:
    """Import an ops module named by a dotted name (``my_ops``, ``pkg.ops``)
    or by the path of its file (``./my_ops.py``, ``ops/my_ops.py``).

    A file's folder goes first on ``sys.path`` and the module is imported by
    its file name, the way ``python my_ops.py`` would find its neighbours;
    process-pool children given the same spec resolve it the same way.
    """
    looks_like_path = spec.endswith(".py") or os.sep in spec or "/" in spec
    if not looks_like_path:
        return importlib.import_module(spec)
    path = Path(spec)
    if not path.is_file() or path.suffix != ".py":
        raise ModuleNotFoundError(f"no Python file {spec!r} (from {os.getcwd()})")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.import_module(path.stem)
    loaded = getattr(module, "__file__", None)
    if loaded is None or Path(loaded).resolve() != path.resolve():
        raise ImportError(f"{spec!r} is shadowed by the module {path.stem!r} from {loaded}")
    return module
