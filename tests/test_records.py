"""cadenza.records: the fields, defaults, factories, freezing, equality and copies that the
config, the pool and the policy table rely on."""
import pytest

from cadenza import records
from cadenza.records import FrozenInstanceError, field, record


@record(frozen=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


@record
class Bag:
    name: str
    items: list[int] = field(default_factory=list)


def test_fields_by_position_or_name_with_defaults():
    assert Point(1) == Point(x=1, y=0) == Point(1, 0, ())
    assert (Point(1, 2).x, Point(1, 2).y) == (1, 2)
    assert records.fields(Point) == ("x", "y", "tags") == records.fields(Point(3))
    assert repr(Point(1, tags=("a",))) == "Point(x=1, y=0, tags=('a',))"


@pytest.mark.parametrize("call, message", [
    (lambda: Point(), "missing field 'x'"),
    (lambda: Point(1, 2, (), 4), "takes 3 fields, 4 were given"),
    (lambda: Point(1, x=2), "got field 'x' twice"),
    (lambda: Point(1, z=2), "has no field 'z'"),
    (lambda: records.replace(Point(1), z=2), "has no field 'z'"),
])
def test_wrong_fields_are_refused_by_name(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_frozen_records_refuse_assignment_and_hash_by_value():
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'x' of a frozen Point"):
        p.x = 2
    with pytest.raises(FrozenInstanceError):
        del p.y
    assert {Point(1), Point(1), Point(2)} == {Point(1), Point(2)}
    assert records.replace(p, y=5) == Point(1, 5) and p == Point(1)


def test_a_factory_makes_a_fresh_default_for_each_instance_and_mutable_records_are_unhashable():
    a, b = Bag("a"), Bag("b")
    a.items.append(1)
    assert (a.items, b.items) == ([1], [])
    assert not hasattr(Bag, "items")
    a.name = "c"
    assert records.asdict(a) == {"name": "c", "items": [1]}
    assert Bag("c", [1]) == a and Bag("c") != a and a != ("c", [1])
    with pytest.raises(TypeError):
        hash(a)


def test_a_field_without_default_after_one_with_default_is_refused():
    with pytest.raises(TypeError, match="a field without a default follows one with a default"):
        @record
        class Wrong:
            a: int = 1
            b: int
