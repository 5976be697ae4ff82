"""Each run-config tunable is declared once, with its bounds, and a bad value is refused by name.

Every case below is derived from the Config classes' `model_fields`, so a field added later is
covered without editing this file.
"""

# No `from __future__ import annotations`: the probe op's config annotation is read by Dagster.

import ast
import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import annotated_types as at
import dagster as dg
import pytest
from pydantic.fields import FieldInfo

import k2_assets.definitions  # noqa: F401  (imports every module that declares a Config)
from k2_assets.bronze.ingestion import BronzeCommitter, BronzeIngestionConfig, IngestionSettings
from k2_assets.cli import build_parser
from k2_assets.cli.jobs import flag, ingestion_run_config
from k2_assets.definitions import defs
from k2_assets.feeds.jobs import DEFAULTS as FEED_DEFAULTS
from k2_assets.feeds.jobs import FeedConfig
from k2_assets.silver.assets import SilverConfig
from k2_assets.silver.rules import TimestampBounds, ValidationRules
from k2_assets.tunables import Tunables, field_bounds

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("k2_assets", "k2_resources", "bench")


def all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def k2_configs() -> list[type[dg.Config]]:
    """Every run config K2 declares (not resources), found by subclassing, not by a list."""
    resources = (dg.ConfigurableResource, dg.ConfigurableIOManager, dg.ConfigurableIOManagerFactory)
    found = {
        c
        for c in all_subclasses(dg.Config)
        if c.__module__.startswith("k2_assets.") and not issubclass(c, resources)
    }
    return sorted(found - {Tunables}, key=lambda c: c.__qualname__)


TUNABLES = [c for c in k2_configs() if issubclass(c, Tunables)]


def bad_values(info: FieldInfo) -> list[Any]:
    """Values each bound of the field refuses: on the bound where it is strict, and one unit past it."""
    number = float if float in (info.annotation, *get_args(info.annotation)) else int
    values: list[Any] = []
    for bound in field_bounds(info):
        if isinstance(bound, at.Gt):
            values += [number(bound.gt), number(bound.gt - 1)]
        elif isinstance(bound, at.Ge):
            values += [number(bound.ge - 1)] + ([bound.ge - 0.5] if number is float else [])
        elif isinstance(bound, at.Lt):
            values += [number(bound.lt), number(bound.lt + 1)]
        elif isinstance(bound, at.Le):
            values += [number(bound.le + 1)]
    return values


def required_values(cls: type[dg.Config]) -> dict[str, Any]:
    """Placeholder values for fields without a default, so that only the field under test is bad."""
    return {
        name: [] if get_origin(info.annotation) is list else "x"
        for name, info in cls.model_fields.items()
        if info.is_required()
    }


BAD_CASES = [
    pytest.param(cls, name, value, id=f"{cls.__name__}.{name}={value!r}")
    for cls in TUNABLES
    for name, info in cls.model_fields.items()
    for value in bad_values(info)
]


def probe_job(cls: type[dg.Config]) -> dg.JobDefinition:
    """A one-op job whose op takes `cls` as its config: Dagster's own path from run config to Config."""

    @dg.op(name="probe")
    def probe(config: cls) -> None:  # type: ignore[valid-type]
        pass

    @dg.job(name=f"probe_{cls.__name__}")
    def job() -> None:
        probe()

    return job


def test_every_k2_config_is_a_tunables_config() -> None:
    """A Config outside Tunables would report a bad bound as pydantic's multi-line text."""
    assert len(k2_configs()) >= 8
    assert [c.__name__ for c in k2_configs() if not issubclass(c, Tunables)] == []


def test_every_tunable_has_a_description() -> None:
    undocumented = [
        f"{cls.__name__}.{name}"
        for cls in TUNABLES
        for name, info in cls.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert undocumented == []


def test_bounded_fields_are_found() -> None:
    """The cases below exist: a bound dropped from a field would shrink this set."""
    bounded = {f"{c.__name__}.{n}" for c, n, _ in (p.values for p in BAD_CASES)}
    assert {
        "BronzeIngestionConfig.max_batch_records",
        "BronzeIngestionConfig.commit_interval_seconds",
        "MaintenanceConfig.orphan_min_age_minutes",
        "BronzeRetentionConfig.snapshot_max_age_hours",
        "TimestampBounds.max_age_hours",
        "GoldDedupConfig.lookback_hours",
    } <= bounded


@pytest.mark.parametrize(("cls", "name", "value"), BAD_CASES)
def test_a_value_out_of_bounds_is_refused_naming_the_setting(
    cls: type[Tunables], name: str, value: Any
) -> None:
    """Built directly (how internal code and tests build it) and through a Dagster run alike."""
    values = {**required_values(cls), name: value}
    with pytest.raises(cls.bounds_error) as refused:
        cls(**values)
    assert str(refused.value).startswith(f"{cls.setting_prefix}{name} must ")
    assert f"not {value!r}" in str(refused.value)

    result = probe_job(cls).execute_in_process(
        run_config={"ops": {"probe": {"config": values}}}, raise_on_error=False
    )
    assert not result.success
    cause = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.cause
    assert cause.cls_name == cls.bounds_error.__name__
    assert f"{cls.setting_prefix}{name} must " in cause.message


@pytest.mark.parametrize("cls", TUNABLES, ids=lambda c: c.__name__)
def test_defaults_and_bounds_themselves_are_accepted(cls: type[Tunables]) -> None:
    """The bounds refuse only what they say: every default, and every inclusive bound, is valid."""
    cls(**required_values(cls))
    for name, info in cls.model_fields.items():
        for bound in field_bounds(info):
            if isinstance(bound, at.Ge | at.Le):
                edge = bound.ge if isinstance(bound, at.Ge) else bound.le
                cls(**{**required_values(cls), name: edge})


def test_ingestion_settings_take_every_default_from_the_config() -> None:
    config_fields = set(BronzeIngestionConfig.model_fields)
    assert {f.name for f in dataclasses.fields(IngestionSettings)} == config_fields
    built = IngestionSettings(commit_interval_seconds=1.0)
    for name in config_fields - {"commit_interval_seconds"}:
        assert getattr(built, name) == BronzeIngestionConfig.default_of(name), name
    retries = inspect.signature(BronzeCommitter).parameters["max_retries"].default
    assert retries == BronzeIngestionConfig.default_of("max_fence_retries")


def test_validation_rules_are_the_silver_configs_bounds() -> None:
    assert ValidationRules() == TimestampBounds().rules() == SilverConfig().rules()
    assert set(SilverConfig.model_fields) == set(TimestampBounds.model_fields)


def test_feed_config_defaults_are_feed_settings_defaults() -> None:
    """FeedSettings declares a feed's tunables; the job differs only in living a day, not forever.

    url and symbols default to the exchange's (None in the config): not tunables of FeedSettings.
    """
    shared = {f.name for f in dataclasses.fields(FEED_DEFAULTS)} & set(FeedConfig.model_fields) - {
        "url",
        "symbols",
    }
    differing = {n for n in shared if FeedConfig.default_of(n) != getattr(FEED_DEFAULTS, n)}
    assert differing == {"max_runtime_seconds"}


def ingest_parser_actions() -> dict[str, Any]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")  # argparse keeps no public map
    return {a.dest: a for a in subparsers.choices["ingest"]._actions}


def test_k2_ingest_has_a_flag_per_field_described_by_the_config_and_restating_no_default() -> None:
    actions = ingest_parser_actions()
    for name, info in BronzeIngestionConfig.model_fields.items():
        action = actions[name]
        assert action.option_strings == [flag(name)]
        assert action.default in (None, False), f"{name}: the CLI restates a default"
        assert info.description.rstrip(".") in action.help and f"default: {info.default}" in action.help
    args = build_parser().parse_args(["ingest", "--exchange", "binance"])
    assert ingestion_run_config("binance", args) == {"ops": {"ingest_binance_trades": {"config": {}}}}


def test_every_k2_ingest_flag_reaches_the_run_config_the_job_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag set to a valid non-default value lands in the run config under the field's name."""
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # resolved by validation, never reached
    monkeypatch.setenv("K2_SCHEMA_REGISTRY_URL", "http://127.0.0.1:9")
    argv = ["ingest", "--exchange", "binance"]
    expected: dict[str, Any] = {}
    for name, info in BronzeIngestionConfig.model_fields.items():
        if info.annotation is bool:
            argv.append(flag(name))
            expected[name] = True
        else:
            value = 7 if int in (info.annotation, *get_args(info.annotation)) else 7.5
            argv += [flag(name), str(value)]
            expected[name] = value
    run_config = ingestion_run_config("binance", build_parser().parse_args(argv))
    assert run_config["ops"]["ingest_binance_trades"]["config"] == expected
    job = defs.resolve_job_def("bronze_binance_ingestion")
    assert dg.validate_run_config(job, run_config)["ops"]["ingest_binance_trades"]["config"] == expected


def literal_sites(name: str, default: Any) -> list[str]:
    """Where code outside tests writes `name` next to the literal `default`: a declaration or a copy.

    Counted: `name: T = default`, `name = default`, `name: T = Field(default, ...)`, `f(name=default)`,
    a parameter `name=default`, and `add_argument("--name", default=default)`.
    """
    sites = []
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for value in assigned_literals(node, name):
                    if type(value) is type(default) and value == default:
                        sites.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sites


def constant(node: ast.AST | None) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        return -node.operand.value
    return None


def assigned_literals(node: ast.AST, name: str) -> Iterator[Any]:
    """The literal values `node` gives to something called `name`."""
    if isinstance(node, ast.AnnAssign | ast.Assign):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field" and value.args:
                value = value.args[0]
            yield constant(value)
    elif isinstance(node, ast.Call):
        yield from (constant(k.value) for k in node.keywords if k.arg == name)
        is_flag = getattr(node.func, "attr", None) == "add_argument" and node.args
        if is_flag and constant(node.args[0]) == flag(name):
            yield from (constant(k.value) for k in node.keywords if k.arg == "default")
    elif isinstance(node, ast.FunctionDef):
        arguments = node.args.args + node.args.kwonlyargs
        defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
        defaults += node.args.kw_defaults
        yield from (constant(d) for a, d in zip(arguments, defaults, strict=True) if a.arg == name)


TUNABLE_DEFAULTS = sorted(
    {
        (name, info.default)
        for cls in TUNABLES
        for name, info in cls.model_fields.items()
        if info.default is not None and isinstance(info.default, int | float | str)
    },
    key=repr,
)


@pytest.mark.parametrize(("name", "default"), TUNABLE_DEFAULTS, ids=lambda v: str(v))
def test_no_tunable_default_is_written_down_twice(name: str, default: Any) -> None:
    """A default restated beside its declaration drifts: e.g. IngestionSettings' 100_000 did."""
    sites = literal_sites(name, default)
    assert len(sites) <= 1, f"{name} = {default!r} is written at {sites}"


def op_config_class(job: dg.JobDefinition, op_name: str) -> type[dg.Config]:
    """The Config class an op of a job takes, from its compute function's `config` parameter."""
    compute = job.graph.node_named(op_name).definition.compute_fn.decorated_fn
    return inspect.signature(compute).parameters["config"].annotation


@pytest.mark.parametrize("path", sorted((ROOT / "run_config").glob("*.yaml")), ids=lambda p: p.stem)
def test_checked_in_run_configs_restate_no_default(path: Path) -> None:
    """run_config/ says 'as its schedule runs it': a copied default would stop being true when it changes."""
    import yaml

    job = defs.resolve_job_def(path.stem)
    restated = []
    for op_name, op in yaml.safe_load(path.read_text())["ops"].items():
        cls = op_config_class(job, op_name)
        for name, value in (op.get("config") or {}).items():
            info = cls.model_fields[name]
            if not info.is_required() and value == info.get_default(call_default_factory=True):
                restated.append(f"{op_name}.{name}")
    assert restated == []
