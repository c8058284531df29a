"""DRF fields and serializers built from the definitions: they check types and ranges and document
each job type's params in the OpenAPI schema (one component per definition)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING
from functools import cache
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from api.job_params.definitions import MAX_ID, JobParams, ParamMeta, default_of, param_fields


def parts(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (rest,) = [a for a in args if a is not type(None)]
        return rest, True
    return hint, False


def _range_text(meta: ParamMeta, noun: str) -> str:
    low, high = meta.low, meta.high
    if low is not None and high is not None:
        if meta.open_low and meta.open_high:
            return f"a number strictly between {low:g} and {high:g}"
        left, right = "(" if meta.open_low else "[", ")" if meta.open_high else "]"
        return f"{noun} in {low:g}..{high:g}" if noun == "an integer" else f"{noun} in {left}{low:g}, {high:g}{right}"
    if low is not None:
        if noun == "an integer" and low in (0, 1):
            return "a positive integer" if low == 1 else "a non-negative integer"
        return f"{noun} {'>' if meta.open_low else '>='} {low:g}"
    return noun


def error_message(name: str, hint: Any, meta: ParamMeta) -> str:
    if meta.message:
        return meta.message
    base, _ = parts(hint)
    if base is int:
        return f"params.{name} must be {_range_text(meta, 'an integer')}"
    if base is float:
        return f"params.{name} must be {_range_text(meta, 'a number')}"
    if typing.get_origin(base) is list:
        return f"params.{name} must be a list of {_range_text(meta, 'integers')}"
    return f"params.{name} must be a non-empty string"


ERROR_KEYS = (
    "invalid",
    "required",
    "null",
    "blank",
    "max_value",
    "min_value",
    "max_string_length",
    "max_length",
    "min_length",
    "not_a_list",
    "empty",
    "invalid_choice",
    "not_a_dict",
)


class _Bounded:
    low: float | None = None
    high: float | None = None
    open_low = open_high = False

    def _check(self, value):
        if isinstance(value, bool) or (
            self.low is not None and (value <= self.low if self.open_low else value < self.low)
        ):
            self.fail("invalid")
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            self.fail("invalid")
        return value


class StrictIntegerField(_Bounded, serializers.IntegerField):
    """A JSON integer (no strings, floats or booleans), within the field's range."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return self._check(data)


class StrictFloatField(_Bounded, serializers.FloatField):
    """A finite JSON number (no strings or booleans), within the field's range."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
            self.fail("invalid")
        return self._check(float(data))


class StrictCharField(serializers.CharField):
    """A non-empty JSON string."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field(
    {"oneOf": [{"type": "string", "enum": ["colors"]}, {"type": "integer", "minimum": 1, "maximum": MAX_ID}]}
)
class ConceptSourceField(serializers.Field):
    """``"colors"`` or a segmenter model id."""

    def to_internal_value(self, data):
        if data == "colors" or (isinstance(data, int) and not isinstance(data, bool) and 1 <= data <= MAX_ID):
            return data
        self.fail("invalid")

    def to_representation(self, value):
        return value


def _scalar_field(base: Any, meta: ParamMeta, **kwargs: Any) -> serializers.Field:
    if base is int or base is float:
        cls = StrictIntegerField if base is int else StrictFloatField
        made = cls(min_value=meta.low, max_value=meta.high, **kwargs)
        made.low, made.high, made.open_low, made.open_high = meta.low, meta.high, meta.open_low, meta.open_high
        return made
    if base is str:
        return StrictCharField(max_length=200, **kwargs)
    return ConceptSourceField(**kwargs)


def drf_field(f: dataclasses.Field, meta: ParamMeta, hint: Any) -> serializers.Field:
    """The DRF field that checks and documents one parameter."""
    base, nullable = parts(hint)
    message = error_message(f.name, hint, meta)
    errors = {**dict.fromkeys(ERROR_KEYS, message), "required": f"params.{f.name} is required"}
    default = default_of(f)
    help_text = meta.help + (f" Default: the setting {meta.setting}." if meta.setting else "")
    kwargs: dict[str, Any] = {"help_text": help_text, "error_messages": errors}
    if default is MISSING:
        kwargs["required"] = True
    else:
        kwargs.update(required=False, default=default, allow_null=nullable)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        child = _scalar_field(item, meta, error_messages=errors)
        return serializers.ListField(child=child, max_length=10_000, allow_empty=isinstance(default, list), **kwargs)
    return _scalar_field(base, meta, **kwargs)


class ParamsSerializer(serializers.Serializer):
    """Base of the serializers built from the definitions."""


@cache
def params_serializer(cls: type[JobParams]) -> type[serializers.Serializer]:
    """The DRF serializer of a definition: its fields, typed, ranged, defaulted and described."""
    attrs: dict[str, Any] = {f.name: drf_field(f, meta, hint) for f, meta, hint in param_fields(cls)}
    attrs["__doc__"] = cls.__doc__
    attrs["__module__"] = __name__
    return type(f"{cls.__name__}Serializer", (ParamsSerializer,), attrs)
