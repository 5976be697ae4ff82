"""The differential corpus (issue 12 item 5, reused by issue 13's engine test): a fixed Bronze input
built by the simulator, the pipeline's normalised outputs for it, and the comparison of two outputs.

The corpus is three hours of simulated trades of both exchanges (seeded, fixed market and ingestion
times) with every simulator fault kind: the unreadable and invalid ones (every DLQ category of
FAULT_CATEGORIES), V3-schema records, late trades, redeliveries and replays under new ids. It is
stored with its reference outputs under tests/data/differential/, so the input cannot drift with the
simulator: the stored Bronze rows and the schema ids they carry are what every run reads.

A run (`run_corpus`) is a child process of the tree under test (PYTHONPATH = that tree, checked through
`k2_assets.__file__`): it writes the Bronze rows into a fresh SQLite catalog, serves the corpus's
schemas from a registry of its own, and drives the real Dagster definitions as `k2 run` does — Silver
and DLQ for the ingestion hours, Gold for the event hours, gold_dedup_job, Gold again — then reads
every table back, normalised (`normalise`). A child process gives each run the environment it is
handed, including settings read at import time (K2_ENGINE, K2_PARTITIONS_START).

Regenerate the reference only from the code it is meant to pin (see tests/data/differential/README.md):
`python -m tests.differential_corpus --write-reference DIR` builds the corpus with this tree's
simulator, runs it twice, refuses if the two runs differ by one byte or the corpus misses a fault kind
or DLQ category, and writes the corpus, the outputs and a manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "differential"

SEED = 20261202
CORPUS_START = datetime(2026, 11, 20, 10, 20, tzinfo=UTC)  # after the default K2_PARTITIONS_START
CORPUS_HOURS = 3
RECORDS = {"binance": 3_000, "kraken": 2_000}
# DLQ kinds rarely (their share must stay under the exchanges' 5 % DLQ fail rate, or the Silver run
# fails its blocking check), the kinds that reach Silver often enough to matter for Gold and dedup.
DLQ_KIND_RATE = 0.003
SILVER_KIND_RATE = 0.02
# Bronze reads in commits: a record is ingested at the first 10-second mark after its market time, so
# trades of an hour's last seconds land in the next ingestion hour, like late trades and redeliveries.
INGEST_EVERY_US = 10_000_000

BRONZE_FILE = "bronze.parquet"
SCHEMAS_FILE = "schemas.json"
MANIFEST_FILE = "manifest.json"
ORIGIN_FILE = "origin.json"
COMPRESSION = "zstd"
CORPUS_COLUMNS = ("exchange", "kind")  # stored beside the Bronze columns; not written to Bronze

# Output tables: how to sort them and what to drop beyond WRITE_TIME_COLUMNS (run id, run time).
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "silver_binance_trades": ("topic", "partition", "offset"),
    "silver_kraken_trades": ("topic", "partition", "offset"),
    "silver_dlq_trades": ("exchange", "partition", "offset"),
    "gold_crypto_trades": ("message_id", "timestamp", "exchange", "symbol", "trade_id"),
    "gold_dedup_audit": ("reason", "message_id", "timestamp", "kept_message_id"),
}
RUN_STAMPED_COLUMNS = ("dedup_run_id", "detected_at")
OUTPUT_TABLES = tuple(SORT_KEYS)


def fault_rates() -> dict[str, float]:
    from tests.pipeline_helpers import FAULT_CATEGORIES, VALID_KINDS

    rates = dict.fromkeys(FAULT_CATEGORIES, DLQ_KIND_RATE)
    rates.update(dict.fromkeys((k for k in VALID_KINDS if k != "clean"), SILVER_KIND_RATE))
    return rates


@dataclass(frozen=True)
class Corpus:
    """Bronze rows of both exchanges (with `exchange` and the simulator's `kind` of each row), and the
    schemas, in registration order with the ids their records' headers carry."""

    bronze: pa.Table
    schemas: list[dict[str, Any]]

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.bronze, directory / BRONZE_FILE, compression=COMPRESSION)
        (directory / SCHEMAS_FILE).write_text(json.dumps(self.schemas, indent=1) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Corpus:
        schemas = json.loads((directory / SCHEMAS_FILE).read_text())
        return cls(pq.read_table(directory / BRONZE_FILE), schemas)

    def ingestion_hours(self) -> tuple[datetime, datetime]:
        return _hour_span(self.bronze["ingestion_timestamp"])


def _hour_span(column: pa.ChunkedArray) -> tuple[datetime, datetime]:
    from tests.lakehouse_helpers import hour_of

    return hour_of(pc.min(column).as_py()), hour_of(pc.max(column).as_py())


# -- building the corpus from the simulator ----------------------------------------------------


def build_corpus() -> Corpus:
    """The corpus from this tree's simulator, against a registry of its own (ids from 1)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server
    from k2_resources.exchanges import EXCHANGES

    server = start_registry_server(SchemaStore())
    try:
        with SchemaRegistryClient({"url": server.url}) as registry:
            parts = [_exchange_rows(e, RECORDS[e.name], registry) for e in EXCHANGES]
            return Corpus(pa.concat_tables(parts), registered_schemas(registry))
    finally:
        server.shutdown()


def _exchange_rows(exchange: Any, count: int, registry: Any) -> pa.Table:
    """`count` records of `exchange` as the simulator's producer builds them, as Bronze rows."""
    from k2_resources.dev.simulator.faults import FaultChooser
    from k2_resources.dev.simulator.market import seeded_rng
    from k2_resources.dev.simulator.producer import Encoder, Plan, RecordBuilder

    plan = Plan(
        exchange=exchange,
        count=count,
        rate=count / (CORPUS_HOURS * 3600),
        start=CORPUS_START,
        rates=fault_rates(),
        seed=SEED,
    )
    builder = RecordBuilder(plan, Encoder(registry, exchange), registry)
    # The same stream producer.run() draws kinds from: the corpus is what `k2 simulate` would send.
    chooser = FaultChooser(plan.rates, seeded_rng(plan.seed, f"faults:{exchange.name}"))
    records = [builder.build(chooser.choose()) for _ in range(count)]
    return bronze_rows(exchange, records)


def kafka_partition(key: bytes, partitions: int) -> int:
    """A stable stand-in for the producer's murmur2 partitioner: Silver only carries the coordinates."""
    return zlib.crc32(key) % partitions


def ingested_at_us(market_us: int) -> int:
    return (market_us // INGEST_EVERY_US + 1) * INGEST_EVERY_US


def bronze_rows(exchange: Any, records: Sequence[Any]) -> pa.Table:
    """Bronze rows as ingestion writes them, offsets per Kafka partition in production order."""
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.feeds import micros_to_datetime

    next_offset: Counter[int] = Counter()
    partitions, offsets = [], []
    for record in records:
        partition = kafka_partition(record.key, exchange.kafka_partitions)
        partitions.append(partition)
        offsets.append(next_offset[partition])
        next_offset[partition] += 1
    ingested = [micros_to_datetime(ingested_at_us(r.market_us)) for r in records]
    n = len(records)
    bronze = pa.table(
        {
            "raw_bytes": pa.array([r.value for r in records], pa.binary()),
            "message_key": pa.array([r.key for r in records], pa.binary()),
            "topic": [exchange.topic] * n,
            "partition": pa.array(partitions, pa.int32()),
            "offset": pa.array(offsets, pa.int64()),
            "kafka_timestamp": pa.array(
                [micros_to_datetime(r.timestamp_ms * 1000) for r in records], pa.timestamp("us", tz="UTC")
            ),
            "ingestion_timestamp": pa.array(ingested, pa.timestamp("us", tz="UTC")),
            "ingestion_date": pa.array([t.date() for t in ingested], pa.date32()),
        },
        schema=bronze_table_spec(exchange).arrow_schema,
    )
    labels = {"exchange": [exchange.name] * n, "kind": [r.kind for r in records]}
    return pa.table({**labels, **{name: bronze[name] for name in bronze.column_names}})


def registered_schemas(registry: Any) -> list[dict[str, Any]]:
    """Every (subject, version) in order of schema id: re-registering them in that order gives the ids."""
    entries = []
    for subject in sorted(registry.get_subjects()):
        for version in registry.get_versions(subject):
            registered = registry.get_version(subject, version)
            entries.append(
                {"id": registered.schema_id, "subject": subject, "schema": registered.schema.schema_str}
            )
    return sorted(entries, key=lambda e: (e["id"], e["subject"]))


def register_schemas(registry: Any, schemas: Iterable[Mapping[str, Any]]) -> None:
    """Register the corpus's schemas in a fresh registry; fail if one gets another id than stored."""
    from confluent_kafka.schema_registry import Schema

    for entry in schemas:
        got = registry.register_schema(entry["subject"], Schema(entry["schema"], "AVRO"))
        if got != entry["id"]:
            raise RuntimeError(
                f"{entry['subject']} registered as schema id {got}, but the corpus's records carry {entry['id']}:"
                " the registry must be fresh and take the schemas in the stored order"
            )


# -- running the corpus through the pipeline ---------------------------------------------------


def run_corpus(
    env: Mapping[str, str] | None = None,
    corpus_dir: Path = REFERENCE_DIR,
    tree: Path = REPO_ROOT,
    timeout_s: float = 900.0,
) -> dict[str, pa.Table]:
    """The normalised outputs of the corpus in `corpus_dir` run by the code of `tree`, in a child
    process whose environment is this one's plus `env` (e.g. {"K2_ENGINE": "spark"})."""
    with tempfile.TemporaryDirectory(prefix="k2-differential-") as scratch:
        out = Path(scratch) / "out"
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), child_env.get("PYTHONPATH"))))
        command = [
            sys.executable,
            "-m",
            "tests.differential_corpus",
            "--materialise",
            str(corpus_dir),
            str(out),
        ]
        done = subprocess.run(
            command, cwd=tree, env=child_env, capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0:
            raise RuntimeError(f"corpus run failed ({done.returncode}):\n{done.stderr[-6000:]}")
        origin = json.loads((out / ORIGIN_FILE).read_text())
        if not Path(origin["k2_assets"]).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the corpus ran k2_assets from {origin['k2_assets']}, not from {tree}")
        return read_outputs(out)


def materialise(corpus: Corpus, home: Path) -> dict[str, pa.Table]:
    """Run `corpus` through the real Dagster definitions in this process (K2_HOME = `home`), as `k2 run`
    does; the normalised tables. Sets the process's K2_* settings, so call it in a process of its own."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server

    server = start_registry_server(SchemaStore())
    try:
        with SchemaRegistryClient({"url": server.url}) as registry:
            register_schemas(registry, corpus.schemas)
        os.environ["K2_HOME"] = str(home)
        # Read when k2_assets.partitions is imported: the corpus's hours must be partitions whatever the
        # default start becomes.
        os.environ["K2_PARTITIONS_START"] = _hour_span(corpus.bronze["kafka_timestamp"])[0].date().isoformat()
        os.environ["K2_SCHEMA_REGISTRY_URL"] = server.url
        os.environ["K2_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"  # nothing here reads Kafka
        write_bronze(corpus)
        run_pipeline(corpus)
        return read_tables()
    finally:
        server.shutdown()


def write_bronze(corpus: Corpus) -> None:
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import EXCHANGES
    from k2_resources.iceberg import IcebergCatalogResource

    catalog = IcebergCatalogResource()
    for exchange in EXCHANGES:
        spec = bronze_table_spec(exchange)
        rows = corpus.bronze.filter(pc.equal(corpus.bronze["exchange"], exchange.name))
        catalog.ensure_table(spec).append(rows.drop_columns(list(CORPUS_COLUMNS)).cast(spec.arrow_schema))


def run_pipeline(corpus: Corpus) -> None:
    """Silver + DLQ over the ingestion hours, Gold over the event hours, dedup, Gold again (k2 run's
    order, each a single-run backfill); raises if any run fails."""
    import dagster as dg

    from k2_assets.gold.assets import GOLD_KEY
    from tests.pipeline_helpers import SILVER_KEYS, hour_key, materialize, run_job

    first_ingested, last_ingested = corpus.ingestion_hours()
    first_event, last_event = _hour_span(corpus.bronze["kafka_timestamp"])
    first_event, last_event = min(first_event, first_ingested), max(last_event, last_ingested)
    # The dedup job's window ends with the running hour: reach back to the corpus's first event hour.
    lookback = math.ceil((datetime.now(UTC) - first_event) / timedelta(hours=1)) + 2
    dedup_config = {"ops": {"find_gold_duplicates": {"config": {"lookback_hours": lookback}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        materialize(instance, SILVER_KEYS, hour_key(first_ingested), hour_key(last_ingested))
        materialize(instance, [GOLD_KEY], hour_key(first_event), hour_key(last_event))
        if not run_job("gold_dedup_job", instance, dedup_config).success:
            raise RuntimeError("gold_dedup_job failed")
        materialize(instance, [GOLD_KEY], hour_key(first_event), hour_key(last_event))


def read_tables() -> dict[str, pa.Table]:
    from k2_assets.tables import all_table_specs
    from tests.pipeline_helpers import table_rows

    specs = {spec.name: spec for spec in all_table_specs()}
    return {name: normalise(name, table_rows(specs[name])) for name in OUTPUT_TABLES}


def normalise(name: str, rows: pa.Table) -> pa.Table:
    """`rows` without the columns stamped by the run (time, run id, run's partition label), sorted by
    the table's key, with plain Arrow fields (no Iceberg field-id metadata)."""
    from tests.pipeline_helpers import WRITE_TIME_COLUMNS

    keep = [c for c in rows.column_names if c not in (*WRITE_TIME_COLUMNS, *RUN_STAMPED_COLUMNS)]
    rows = rows.select(keep).sort_by([(k, "ascending") for k in SORT_KEYS[name]])
    return plain(rows)


def plain(rows: pa.Table) -> pa.Table:
    """`rows` with one Arrow type per Iceberg type: which of string / large_string (binary, list) a
    reader returns depends on the writer of the data files, not on the table (a DuckDB-written file
    reads back as string where a PyArrow-written one gives large_string)."""
    schema = pa.schema([pa.field(f.name, _plain_type(f.type), f.nullable) for f in rows.schema])
    return pa.Table.from_arrays([rows[f.name].combine_chunks().cast(f.type) for f in schema], schema=schema)


def _plain_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_field
        return pa.list_(pa.field("element", _plain_type(item.type), item.nullable))
    return kind


def write_outputs(tables: Mapping[str, pa.Table], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, directory / f"{name}.parquet", compression=COMPRESSION)


def read_outputs(directory: Path) -> dict[str, pa.Table]:
    return {name: pq.read_table(directory / f"{name}.parquet") for name in OUTPUT_TABLES}


# -- comparing outputs ---------------------------------------------------------------------------


def differences(
    expected: Mapping[str, pa.Table], actual: Mapping[str, pa.Table], shown: int = 5
) -> list[str]:
    """One message per table that differs, naming its first differing rows and columns."""
    return [m for name in OUTPUT_TABLES if (m := table_difference(name, expected[name], actual[name], shown))]


def table_difference(name: str, expected: pa.Table, actual: pa.Table, shown: int = 5) -> str | None:
    expected, actual = plain(expected), plain(actual)
    if not expected.schema.equals(actual.schema):
        return f"{name}: schema differs\n  expected {_fields(expected)}\n  actual   {_fields(actual)}"
    keys = SORT_KEYS[name]
    want, got = _keyed(expected, keys), _keyed(actual, keys)
    if want.keys() != got.keys() or expected.num_rows != actual.num_rows:
        missing = [k for k in want if k not in got]
        extra = [k for k in got if k not in want]
        return (
            f"{name}: {actual.num_rows} rows, expected {expected.num_rows}; by key {keys}:\n"
            f"  missing {len(missing)}, first: {missing[:shown]}\n"
            f"  unexpected {len(extra)}, first: {extra[:shown]}"
        )
    lines, per_column = [], Counter()
    for index, (want, got) in enumerate(zip(expected.to_pylist(), actual.to_pylist(), strict=True)):
        changed = [c for c in expected.column_names if want[c] != got[c]]
        per_column.update(changed)
        if changed and len(lines) < shown:
            key = {k: want[k] for k in keys}
            detail = "; ".join(f"{c}: expected {want[c]!r}, got {got[c]!r}" for c in changed)
            lines.append(f"  row {index} {key}: {detail}")
    if not per_column:
        return None
    return f"{name}: rows differ in columns {dict(per_column)} (rows with that column changed)\n" + "\n".join(
        lines
    )


def _fields(table: pa.Table) -> list[str]:
    return [f"{f.name}: {f.type}" for f in table.schema]


def _keyed(table: pa.Table, keys: Sequence[str]) -> dict[tuple, None]:
    return dict.fromkeys(zip(*(table[k].to_pylist() for k in keys), strict=True))


# -- what the corpus holds -----------------------------------------------------------------------


def coverage_gaps(corpus: Corpus, outputs: Mapping[str, pa.Table]) -> list[str]:
    """What the corpus fails to exercise: a fault kind missing from either exchange, a DLQ category of
    FAULT_CATEGORIES missing from the DLQ, late trades not in a later ingestion hour, no dedup removal."""
    from k2_resources.dev.simulator.faults import KINDS
    from tests.pipeline_helpers import FAULT_CATEGORIES

    gaps = []
    for exchange in RECORDS:
        rows = corpus.bronze.filter(pc.equal(corpus.bronze["exchange"], exchange))
        present = set(rows["kind"].to_pylist())
        gaps += [f"{exchange} has no {kind} record" for kind in KINDS if kind not in present]
    dlq = outputs["silver_dlq_trades"]
    categories = set(dlq["error_category"].to_pylist())
    gaps += [f"the DLQ has no {c} row" for c in sorted(set(FAULT_CATEGORIES.values()) - categories)]
    from tests.lakehouse_helpers import hour_of

    late = corpus.bronze.filter(pc.equal(corpus.bronze["kind"], "late_trade"))
    crossing = [
        hour_of(k) < hour_of(i)
        for k, i in zip(
            late["kafka_timestamp"].to_pylist(), late["ingestion_timestamp"].to_pylist(), strict=True
        )
    ]
    if not crossing or not all(crossing):
        gaps.append("a late trade is ingested in its own event hour")
    reasons = set(outputs["gold_dedup_audit"]["reason"].to_pylist())
    if "DUPLICATE_TRADE_KEY" not in reasons:
        gaps.append("the dedup job removed no replayed trade (DUPLICATE_TRADE_KEY)")
    return gaps


def misrouted(corpus: Corpus, outputs: Mapping[str, pa.Table], shown: int = 5) -> list[str]:
    """Records not where their kind says: a FAULT_CATEGORIES kind not in the DLQ under its category, a
    VALID_KINDS kind not in its exchange's Silver table (located by exchange, Kafka partition, offset)."""
    from tests.pipeline_helpers import FAULT_CATEGORIES, VALID_KINDS

    dlq = outputs["silver_dlq_trades"]
    found = dict(zip(_coordinates(dlq), dlq["error_category"].to_pylist(), strict=True))
    for exchange in RECORDS:
        silver = outputs[f"silver_{exchange}_trades"]
        found.update(dict.fromkeys(_coordinates(silver, exchange), "SILVER"))
    wrong = []
    for where, kind in zip(_coordinates(corpus.bronze), corpus.bronze["kind"].to_pylist(), strict=True):
        expected = FAULT_CATEGORIES.get(kind, "SILVER" if kind in VALID_KINDS else None)
        if found.get(where) != expected:
            wrong.append(f"{kind} record at {where} is in {found.get(where)}, expected {expected}")
    return wrong[:shown] + ([f"... {len(wrong)} in all"] if len(wrong) > shown else [])


def _coordinates(table: pa.Table, exchange: str | None = None) -> list[tuple[str, int, int]]:
    """(exchange name, Kafka partition, offset) of each row; `exchange` for a table of one exchange."""
    names = table["exchange"].to_pylist() if exchange is None else [exchange] * table.num_rows
    return list(zip(names, table["partition"].to_pylist(), table["offset"].to_pylist(), strict=True))


def manifest(corpus: Corpus, outputs: Mapping[str, pa.Table], commit: str) -> dict[str, Any]:
    per_exchange = {
        e: dict(
            sorted(
                Counter(
                    corpus.bronze.filter(pc.equal(corpus.bronze["exchange"], e))["kind"].to_pylist()
                ).items()
            )
        )
        for e in RECORDS
    }
    first, last = corpus.ingestion_hours()
    return {
        "generated_from_commit": commit,
        "seed": SEED,
        "market_start": CORPUS_START.isoformat(),
        "ingestion_hours": [first.isoformat(), last.isoformat()],
        "event_hours": [t.isoformat() for t in _hour_span(corpus.bronze["kafka_timestamp"])],
        "records": dict(Counter(corpus.bronze["exchange"].to_pylist())),
        "kinds": per_exchange,
        "dlq_categories": dict(
            sorted(Counter(outputs["silver_dlq_trades"]["error_category"].to_pylist()).items())
        ),
        "dedup_reasons": dict(sorted(Counter(outputs["gold_dedup_audit"]["reason"].to_pylist()).items())),
        "rows": {name: table.num_rows for name, table in outputs.items()},
    }


# -- entry points --------------------------------------------------------------------------------


def write_reference(directory: Path) -> dict[str, Any]:
    """Build the corpus with this tree's code, run it twice, and write it with its outputs only when
    both runs give byte-identical files and the corpus covers every fault kind and DLQ category."""
    with tempfile.TemporaryDirectory(prefix="k2-differential-ref-") as scratch:
        staged = Path(scratch) / "corpus"
        corpus = build_corpus()
        corpus.write(staged)
        if corpus.bronze != Corpus.read(staged).bronze or corpus != build_corpus():
            raise RuntimeError("building the corpus twice gave different Bronze rows or schemas")
        runs = []
        for attempt in ("first", "second"):
            outputs = run_corpus(corpus_dir=staged)
            write_outputs(outputs, Path(scratch) / attempt)
            runs.append(outputs)
        for name in OUTPUT_TABLES:
            one, two = (Path(scratch) / a / f"{name}.parquet" for a in ("first", "second"))
            if one.read_bytes() != two.read_bytes():
                raise RuntimeError(f"two runs of the corpus wrote different {name} outputs")
        if gaps := coverage_gaps(corpus, runs[0]) + misrouted(corpus, runs[0]):
            raise RuntimeError("the corpus does not cover: " + "; ".join(gaps))
        corpus.write(directory)
        write_outputs(runs[0], directory)
        commit = _head_commit()
        summary = manifest(corpus, runs[0], commit)
        (directory / MANIFEST_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def _head_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "k2_assets", "k2_resources"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def _materialise_command(corpus_dir: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="k2-differential-home-") as home:
        outputs = materialise(Corpus.read(corpus_dir), Path(home))
    import k2_assets

    write_outputs(outputs, out)
    (out / ORIGIN_FILE).write_text(json.dumps({"k2_assets": k2_assets.__file__}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.differential_corpus", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--write-reference", type=Path, metavar="DIR", help="build, check and store the reference"
    )
    group.add_argument(
        "--materialise", nargs=2, type=Path, metavar=("CORPUS_DIR", "OUT_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.materialise:
        _materialise_command(*args.materialise)
        return 0
    print(json.dumps(write_reference(args.write_reference), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
