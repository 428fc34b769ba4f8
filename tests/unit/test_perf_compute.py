"""The value classes whose ``__init__`` is written out for speed (gateway/engine/compute.py, metering.py)
take exactly their dataclass fields, in order, with the declared defaults; and build equal objects."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from gateway.engine.compute import Bound, ComputeRequest, Measured, Usage
from gateway.engine.metering import ParsedRequest


@pytest.mark.parametrize("cls", [ComputeRequest, Bound, Usage, Measured, ParsedRequest])
def test_hand_written_init_matches_the_fields(cls: type) -> None:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default == f.default_factory(), f.name
        else:
            assert p.default is inspect.Parameter.empty, f.name


def test_the_objects_stay_frozen_equal_and_replaceable() -> None:
    u = Usage(2, 10, 3, 4)
    assert u == Usage(samples=2, prompt_tokens=10, reasoning_tokens=3, output_tokens=4, source="upstream")
    assert hash(u) == hash(Usage(2, 10, 3, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.samples = 3  # type: ignore[misc]
    assert dataclasses.replace(u, samples=5).samples == 5
    m = Measured(u, 1.5, 2e9)
    assert m.overrun is False and m.overrun_reasons == ()
    r = ComputeRequest("openai.chat", "dense")
    assert (r.samples, r.prompts, r.output_cap) == (1, 1, None)
    assert repr(r).startswith("ComputeRequest(api='openai.chat'")


@pytest.mark.parametrize("cls", [ComputeRequest, Bound, Usage, Measured, ParsedRequest])
def test_hand_written_init_fills_exactly_the_fields_in_their_order(cls: type) -> None:
    """``__init__`` fills the instance's dict in one call: with every field, nothing else, in declared order
    (``Bound.as_dict`` copies that dict, and the audit record keeps its key order)."""
    names = [f.name for f in dataclasses.fields(cls)]
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    # A distinct value per field, given by position: a field filled from the wrong parameter shows.
    obj = cls(*(object() for _ in params))
    assert list(vars(obj)) == names
    given = [vars(obj)[n] for n in names]
    assert len({id(v) for v in given}) == len(names)
    rebuilt = cls(*given)
    assert all(getattr(rebuilt, n) is v for n, v in zip(names, given, strict=True))


def test_bound_as_dict_is_a_new_dict_of_its_fields_in_order() -> None:
    b = Bound(2, 10, 100, 50, 200, 200, 100, 3.5, 4e12)
    d = b.as_dict()
    assert d == {f.name: getattr(b, f.name) for f in dataclasses.fields(Bound)}
    assert list(d) == [f.name for f in dataclasses.fields(Bound)]
    d["k_max"] = 0
    assert b.k_max == 3.5 and b.as_dict() is not b.as_dict()
