"""Run-config tunables: each declared once, as a field of a `Tunables` config with its bounds.

A field's default, unit (in its name or description) and bounds (pydantic constraints such as
`Field(60.0, gt=0)`) are its whole declaration: internal settings, CLI flags and benchmarks derive
from it. Dagster 1.13 does not carry pydantic constraints into its run-config schema, so
`validate_run_config` accepts a value out of bounds; the run refuses it when the op builds its
config, before any work. Pydantic's own message puts the field name on a line of its own, so
`Tunables` raises one line instead: "<prefix><field> must be positive, not 0 (<description>)".
"""

from __future__ import annotations

from typing import Any, ClassVar

import annotated_types as at
import dagster as dg
import pydantic
from pydantic.fields import FieldInfo

# How each pydantic bound reads in an error message; a bound of 0 has a plainer wording.
BOUND_WORDS: dict[type, tuple[str, str, str]] = {
    # bound type: (attribute, wording, wording at 0)
    at.Gt: ("gt", "must be above {bound}", "must be positive"),
    at.Ge: ("ge", "must be at least {bound}", "must not be negative"),
    at.Lt: ("lt", "must be below {bound}", "must be negative"),
    at.Le: ("le", "must be at most {bound}", "must not be positive"),
}
ERROR_BOUNDS = {
    "greater_than": at.Gt,
    "greater_than_equal": at.Ge,
    "less_than": at.Lt,
    "less_than_equal": at.Le,
}


class TunableError(ValueError):
    """A run-config value outside its declared bounds; the message names the setting."""


def field_bounds(info: FieldInfo) -> list[at.BaseMetadata]:
    """The numeric bounds pydantic enforces on a field (Gt, Ge, Lt, Le)."""
    return [m for m in info.metadata if type(m) in BOUND_WORDS]


def bound_text(bound: at.BaseMetadata) -> str:
    """'must be positive', 'must be at least 30', ... for one bound."""
    attribute, wording, at_zero = BOUND_WORDS[type(bound)]
    value = getattr(bound, attribute)
    return at_zero if value == 0 else wording.format(bound=f"{value:g}")


def describe_field(info: FieldInfo) -> str:
    """A field's description, its bounds and its default, as a CLI help text or a UI description."""
    parts = [(info.description or "").rstrip(".")]
    parts += [bound_text(b) for b in field_bounds(info)]
    if not info.is_required():
        parts.append(f"default: {info.default}")
    return "; ".join(p for p in parts if p)


class Tunables(dg.Config):
    """Base of K2's run configs: a value outside a field's bounds fails as one line naming the field.

    `setting_prefix` starts the message ("ingestion config "); `bounds_error` is the exception type
    callers already catch for this config (MaintenanceConfigError for maintenance).
    """

    setting_prefix: ClassVar[str] = ""
    bounds_error: ClassVar[type[ValueError]] = TunableError

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except pydantic.ValidationError as error:
            raise self.bounds_error(self.explain(error)) from None

    @classmethod
    def explain(cls, error: pydantic.ValidationError) -> str:
        """One line per refused value: '<prefix><field> must be positive, not 0 (<description>)'."""
        return "; ".join(cls.explain_one(e) for e in error.errors())

    @classmethod
    def explain_one(cls, error: Any) -> str:
        name = str(error["loc"][0]) if error["loc"] else "config"
        info = cls.model_fields.get(name)
        note = f" ({info.description})" if info is not None and info.description else ""
        bound_type = ERROR_BOUNDS.get(error["type"])
        if bound_type is not None:
            attribute = BOUND_WORDS[bound_type][0]
            rule = bound_text(bound_type(error["ctx"][attribute]))
        else:
            rule = f"is invalid: {error['msg']}"
        return f"{cls.setting_prefix}{name} {rule}, not {error.get('input')!r}{note}"

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The declared default of one field: what derived settings use instead of restating it."""
        return cls.model_fields[name].get_default(call_default_factory=True)
