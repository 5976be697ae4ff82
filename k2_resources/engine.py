"""Which engine computes Silver and Gold: K2_ENGINE=embedded (default) or spark, one choice per deployment.

`embedded` runs each pass in the Dagster step's own process (PyArrow, fastavro, DuckDB) and writes
through PyIceberg. `spark` runs the same passes as Spark jobs on `IcebergSparkResource` (local[*] by
default, a cluster by K2_SPARK_MASTER, Spark Connect by K2_SPARK_REMOTE) and reads and writes the same
Iceberg tables through Iceberg's Spark runtime on the same catalog. Both engines write a Dagster
partition as one atomic overwrite of the rows in its scope, with the run id and partition key in the
snapshot summary, so a table never tells which engine wrote it except by the `k2.engine` summary key
and the `engine` materialisation metadata.

The Spark-side table helpers live here too, so the Silver and Gold engines write alike:
`spark_table`, `scope_condition`, `replace_scope`, and `spark_failures`, which turns a failed Spark job
into a Dagster step failure carrying the driver's error.
"""

# No `from __future__ import annotations`: Dagster resolves resource field annotations at class creation.

import dataclasses
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from k2_resources.iceberg import IcebergCatalogResource, TableSpec
from k2_resources.io_manager import IcebergIOManager, RowScope, WriteReport
from k2_resources.settings import ENGINE
from k2_resources.spark import IcebergSparkResource

ENGINES = ENGINE.choices
EMBEDDED, SPARK = ENGINES
ENGINE_METADATA = "engine"  # materialisation metadata: which engine computed and wrote the partition
ENGINE_SUMMARY = "k2.engine"  # the same, in the Iceberg snapshot summary
# Spark settings of the engine's jobs (shuffle partitions and AQE come from IcebergSparkResource):
# - Arrow batches of 50K rows into and out of the Python tasks: bounded memory per task (a batch of
#   Bronze and its Silver and DLQ rows), large enough that per-batch costs vanish (a runtime setting);
# - Python workers forked from a daemon that has imported Silver's task code once: each worker would
#   otherwise import it itself (Dagster, PyIceberg, pandas: ~5 s of CPU per worker, per Spark
#   application). A static setting, which a Spark Connect server holds (SERVER_ONLY).
ENGINE_SPARK_CONFIG = {
    "spark.sql.execution.arrow.maxRecordsPerBatch": "50000",
    "spark.python.daemon.module": "k2_assets.silver.spark_daemon",
}
MAX_ERROR_LINES = 30  # a Spark failure's driver error, as much as a step failure message can carry


class EngineResource(dg.ConfigurableResource):
    """The deployment's engine for Silver and Gold, and the Spark session when it is Spark.

    Spark starts only when a Spark-engine step asks for the session (the embedded engine never
    starts a JVM), and stops when the step ends.
    """

    engine: str = Field(default="", description=f"{' or '.join(ENGINES)}; empty: {ENGINE.name}")
    spark: dg.ResourceDependency[IcebergSparkResource]

    @classmethod
    def for_catalog(cls, iceberg: IcebergCatalogResource) -> "EngineResource":
        """The deployment's engine resource; the environment is read when a run uses it, not here."""
        return cls(
            spark=IcebergSparkResource(
                iceberg=iceberg, app_name="k2-engine", spark_config=ENGINE_SPARK_CONFIG
            )
        )

    @property
    def choice(self) -> str:
        """The configured engine, else K2_ENGINE; a misspelt one fails naming the setting."""
        if not self.engine:
            return ENGINE.value()
        if self.engine.lower() not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        return self.engine.lower()

    @property
    def on_spark(self) -> bool:
        return self.choice == SPARK

    @property
    def session(self) -> Any:
        return self.spark.spark_session

    @property
    def catalog_name(self) -> str:
        return self.spark.catalog_name

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.spark.teardown_after_execution(context)


# --- Writes the IO manager must not repeat ------------------------------------------------------------


@dataclass(frozen=True)
class CommittedWrite:
    """An output the engine has already committed to its table; the IO manager records it only."""

    metadata: Mapping[str, Any] = field(default_factory=dict)


class EngineIOManager(IcebergIOManager):
    """K2's Iceberg IO manager, told apart by engine: Spark outputs arrive already committed."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if isinstance(obj, CommittedWrite):
            context.add_output_metadata(dict(obj.metadata))
            return
        super().handle_output(context, obj)
        context.add_output_metadata({ENGINE_METADATA: EMBEDDED})


# --- Spark side ---------------------------------------------------------------------------------------


def spark_table(catalog_name: str, spec: TableSpec) -> str:
    return f"{catalog_name}.{spec.identifier}"


def read_snapshot(
    spark: Any, catalog_name: str, spec: TableSpec, snapshot_id: int | None, split_bytes: int | None = None
) -> Any:
    """The table as of `snapshot_id` (the one the driver pinned), or None when the table is empty.

    `split_bytes` caps the data one read task gets: Iceberg packs small files into 128 MB splits,
    which for Bronze (many small files per hour, one per ingestion commit) would put an hour's decoding
    in one task, on one core.
    """
    if snapshot_id is None:
        return None
    reader = spark.read.option("versionAsOf", str(snapshot_id))
    if split_bytes:
        reader = reader.option("split-size", str(split_bytes))
    return reader.table(spark_table(catalog_name, spec))


def scope_condition(spec: TableSpec, scope: RowScope) -> Any:
    """`scope` as a Spark column predicate: exactly the rows RowScope.expression selects in PyIceberg."""
    from pyspark.sql import functions as F

    condition = F.lit(True)
    if scope.start is not None and scope.end is not None:
        column = F.col(spec.time_column)
        field_type = spec.schema.find_field(spec.time_column).field_type
        lo, hi = _spark_literal(field_type, scope.start), _spark_literal(field_type, scope.end)
        condition = condition & (column >= lo) & (column < hi)
    if scope.slice_value is not None:
        condition = condition & (F.col(spec.slice_column) == F.lit(scope.slice_value))
    return condition


def _spark_literal(field_type: Any, moment: datetime) -> Any:
    from pyiceberg.types import LongType
    from pyspark.sql import functions as F

    if isinstance(field_type, LongType):
        return F.lit(int(moment.timestamp() * 1_000_000))
    return F.lit(moment)


AT_WRITE = "at-write"  # replace_scope's default: validate from the table's snapshot when the write starts
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_WIDENINGS = 100


def replace_scope(
    frame: Any,
    catalog_name: str,
    spec: TableSpec,
    scope: RowScope,
    properties: Mapping[str, str],
    iceberg: IcebergCatalogResource,
    validate_from: int | None | str = AT_WRITE,
) -> WriteReport:
    """Replace exactly the rows of `scope` with `frame`, in one Iceberg commit made by Spark.

    `DataFrameWriterV2.overwrite(condition)` is Iceberg's overwrite-by-filter: one snapshot that
    deletes the scope's data files and adds the new ones, the same single commit the embedded engine
    makes. Its summary carries `properties` and `k2.engine=spark`. With serializable isolation from
    `validate_from` (the snapshot the caller pinned before computing `frame`, None for a table that
    was empty then; by default the table's snapshot when the write starts), a commit of rows in the
    same scope since then fails this one (Iceberg's ValidationException: `is_write_conflict`) instead
    of being overwritten by data computed without it.

    Overwrite-by-filter can only drop whole files. A data file holding rows inside and outside the
    scope (compaction merges a day's hours into one file) would fail it, where PyIceberg rewrites
    such a file in the same commit; so does this: the filter is widened to whole files
    (`whole_file_scope`) and the rows the widened filter takes outside the scope are written back
    unchanged, read at the snapshot the widening was planned on, in the same single commit.
    """
    from pyspark.sql import functions as F

    table = iceberg.load_table(spec)
    planned = table.current_snapshot()
    if validate_from == AT_WRITE:
        validate_from = planned.snapshot_id if planned is not None else None
    wide = whole_file_scope(table, spec, scope) if planned is not None else scope
    kept, carried = None, 0
    if wide != scope:
        kept = read_snapshot(frame.sparkSession, catalog_name, spec, planned.snapshot_id)
        outside = ~F.coalesce(scope_condition(spec, scope), F.lit(False))  # a null slice is outside too
        kept = kept.where(scope_condition(spec, wide) & outside).persist()
        carried = kept.count()
        frame = frame.unionByName(kept)
    writer = frame.writeTo(spark_table(catalog_name, spec)).option("check-nullability", "false")
    writer = writer.option("isolation-level", "serializable")
    if validate_from is not None:
        writer = writer.option("validate-from-snapshot-id", str(validate_from))
    for key, value in {**properties, ENGINE_SUMMARY: SPARK}.items():
        writer = writer.option(f"snapshot-property.{key}", value)
    try:
        writer.overwrite(scope_condition(spec, wide))
    finally:
        if kept is not None:
            kept.unpersist()
    report = committed_report(iceberg, spec, properties)
    return dataclasses.replace(report, rows=report.rows - carried)


def whole_file_scope(table: Any, spec: TableSpec, scope: RowScope) -> RowScope:
    """The smallest scope containing `scope` whose filter takes every data file wholly or not at all:
    widened to the time bounds of each file it touches (to whole seconds), and without the slice when
    a file it touches holds other slices; repeated until no file straddles it."""
    if scope.start is None or scope.end is None:
        return scope
    time_field = table.schema().find_field(spec.time_column)
    slice_field = table.schema().find_field(spec.slice_column) if scope.slice_value is not None else None
    lo, hi, slice_value = _micros(scope.start), _micros(scope.end), scope.slice_value
    for _ in range(MAX_WIDENINGS):
        current = RowScope(_moment(lo), _moment(hi), slice_value)
        widened = (lo, hi, slice_value)
        for task in table.scan(row_filter=current.expression(spec, table)).plan_files():
            first, last = _bounds(task.file, time_field)
            if first is None or last is None:
                return scope  # no statistics to widen by: Iceberg decides (and refuses a straddling file)
            lo, hi = min(lo, first // 1_000_000 * 1_000_000), max(hi, (last // 1_000_000 + 1) * 1_000_000)
            if slice_field is not None and slice_value is not None:
                low, high = _bounds(task.file, slice_field)
                if not (low == high == slice_value):
                    slice_value = None
        if (lo, hi, slice_value) == widened:
            return current
    raise RuntimeError(f"{spec.identifier}: no whole-file scope around {scope.describe()}")


def _bounds(data_file: Any, field: Any) -> tuple[Any, Any]:
    from pyiceberg.conversions import from_bytes

    low, high = (
        (data_file.lower_bounds or {}).get(field.field_id),
        (data_file.upper_bounds or {}).get(field.field_id),
    )
    if low is None or high is None:
        return None, None
    return from_bytes(field.field_type, low), from_bytes(field.field_type, high)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _moment(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def committed_report(
    iceberg: IcebergCatalogResource, spec: TableSpec, properties: Mapping[str, str]
) -> WriteReport:
    """Rows and files of the newest snapshot carrying `properties` (the commit Spark just made)."""
    table = iceberg.load_table(spec)
    for snapshot in sorted(table.snapshots(), key=lambda s: s.timestamp_ms, reverse=True):
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        if all(summary.get(k) == v for k, v in properties.items()):
            return WriteReport(
                rows=int(summary.get("added-records", 0)),
                data_files=int(summary.get("added-data-files", 0)),
                snapshot_id=snapshot.snapshot_id,
            )
    raise RuntimeError(
        f"Spark reported a write to {spec.identifier} but no snapshot carries {dict(properties)}"
    )


# Iceberg's answers to a commit that met a concurrent one: recompute, never re-commit stale data.
WRITE_CONFLICT_ERRORS = (
    "org.apache.iceberg.exceptions.ValidationException",
    "org.apache.iceberg.exceptions.CommitFailedException",
)


def is_write_conflict(err: BaseException) -> bool:
    """Whether a failed Spark write lost to a concurrent commit of the same rows: Iceberg's exception
    anywhere in the JVM's cause chain (PySpark wraps it in whichever Python class it maps the top to)."""
    # Py4JJavaError keeps the JVM's exception as `java_exception`, PySpark's CapturedException as `_origin`.
    cause = getattr(err, "java_exception", None) or getattr(err, "_origin", None)
    names, depth = [str(err)], 0
    while cause is not None and depth < 20:
        names.append(str(cause.getClass().getName()))
        cause, depth = cause.getCause(), depth + 1
    return any(conflict in name for name in names for conflict in WRITE_CONFLICT_ERRORS)


ROOT_CAUSE = re.compile(r"^(?::\s*)?(?:Caused by: )?([\w.$]+(?:Error|Exception|Invalid)\b.*)$")


def spark_error_text(err: BaseException) -> str:
    """The driver's error of a failed Spark job: exception and cause lines, the Python worker's
    traceback, without the JVM's stack frames."""
    text = str(err).strip() or type(err).__name__
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not line.strip().startswith(("at ", "..."))]
    return "\n".join(kept[:MAX_ERROR_LINES])


def root_cause(message: str) -> str:
    """The most specific line of a Spark error: its last exception or cause line, else its first."""
    causes = [m.group(1) for line in message.splitlines() if (m := ROOT_CAUSE.match(line.strip()))]
    return causes[-1] if causes else message.splitlines()[0]


@contextmanager
def spark_failures(what: str) -> Iterator[None]:
    """A failed Spark job (or a Spark that cannot start) fails the step with the driver's error."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    try:
        yield
    except (PySparkException, Py4JError) as err:
        message = spark_error_text(err)
        raise dg.Failure(
            description=f"{what} failed on Spark ({type(err).__name__}): {root_cause(message)}",
            metadata={ENGINE_METADATA: SPARK, "spark_error": dg.MetadataValue.text(message)},
        ) from err
