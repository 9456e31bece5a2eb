"""`@record`: the part of `dataclasses` cadenza uses, without its start-up cost.

Every master of every upgrade imports its modules again, and `dataclasses` is the largest part
of that: it imports `inspect`, and each class it makes compiles generated methods (about 1 ms a
class). A record's methods are written once, here, and read the field names from the class's
annotations. What it offers: an `__init__` taking the fields by position or name, defaults,
`field(default_factory=...)`, `frozen=True` (with a hash of the fields), `__eq__` and
`__repr__` over the fields, `replace()`, `asdict()` (one level) and `fields()`.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["record", "field", "replace", "asdict", "fields", "FrozenInstanceError"]

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]):
        self.make = make


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A field whose default is made anew for each instance (a list, a dict, a clock reading)."""
    return _Factory(default_factory)


def record(cls: type | None = None, *, frozen: bool = False):
    """`@record` or `@record(frozen=True)` over a class whose annotated attributes are its fields."""
    if cls is None:
        return lambda inner: _make(inner, frozen)
    return _make(cls, frozen)


def _make(cls: type, frozen: bool) -> type:
    names = tuple(cls.__dict__.get("__annotations__") or getattr(cls, "__annotations__", {}))
    defaults: dict[str, Any] = {}
    for name in names:
        value = cls.__dict__.get(name, _MISSING)
        if value is _MISSING:
            if defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with a default")
            continue
        defaults[name] = value
        if isinstance(value, _Factory):
            delattr(cls, name)    # an instance always has its own; the class keeps no factory
    cls._record_fields = names
    cls._record_defaults = defaults
    cls.__init__ = _init
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
        cls.__hash__ = _hash
    else:
        cls.__hash__ = None       # mutable and compared by value: unhashable, as a dataclass is
    return cls


def _init(self, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls._record_fields
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} fields, {len(args)} were given")
    values = dict(zip(names, args))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{cls.__name__}() has no field {name!r}")
        if name in values:
            raise TypeError(f"{cls.__name__}() got field {name!r} twice")
        values[name] = value
    for name in names:
        if name in values:
            value = values[name]
        else:
            value = cls._record_defaults.get(name, _MISSING)
            if value is _MISSING:
                raise TypeError(f"{cls.__name__}() is missing field {name!r}")
            if isinstance(value, _Factory):
                value = value.make()
        object.__setattr__(self, name, value)


def _values(self) -> tuple:
    return tuple(getattr(self, name) for name in type(self)._record_fields)


def _repr(self) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in type(self)._record_fields)
    return f"{type(self).__qualname__}({inner})"


def _eq(self, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _frozen_delattr(self, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")


def replace(obj: Any, **changes: Any) -> Any:
    """A copy of OBJ with CHANGES to its fields."""
    values = {name: getattr(obj, name) for name in type(obj)._record_fields}
    for name in changes:
        if name not in values:
            raise TypeError(f"{type(obj).__name__} has no field {name!r}")
    values.update(changes)
    return type(obj)(**values)


def asdict(obj: Any) -> dict[str, Any]:
    """{field: value} of OBJ, one level deep."""
    return {name: getattr(obj, name) for name in type(obj)._record_fields}


def fields(cls_or_obj: Any) -> tuple[str, ...]:
    """The field names, in order."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return cls._record_fields
