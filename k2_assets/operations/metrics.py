"""What K2 reports to Prometheus, each value derived at scrape time from the Dagster instance or Iceberg.

Counters (records, bytes, commits, halts, runs) are sums over the event log and run storage, which
outlive the exporter: a restart re-reads them and reports the same totals. Bronze materialisations are
read incrementally (the collector remembers the storage id it has summed up to), which is only a cache.
Per-hour Silver figures come from the metadata of the newest evaluation of its conservation and DLQ-rate
checks, for the last SILVER_HOURS hours (bounded label cardinality).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg
from confluent_kafka import Consumer, KafkaException
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from k2_assets.bronze.assets import bronze_asset_key
from k2_assets.bronze.ingestion import read_stored_offsets, read_stored_topic_id
from k2_assets.bronze.jobs import INGESTION_TAG, MAINTENANCE_TAG
from k2_assets.bronze.sensors import NEEDS_A_PERSON, failure_errors, ingestion_state
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.gold.assets import GOLD_KEY
from k2_assets.operations.alerts import run_partition
from k2_assets.partitions import HOUR, hour_key, hour_start
from k2_assets.silver.assets import silver_asset_key
from k2_assets.silver.checks import CONSERVATION, DLQ_RATE
from k2_resources.exchanges import EXCHANGES, ExchangeConfig
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.kafka import KafkaResource
from k2_resources.settings import (
    KAFKA_BOOTSTRAP_SERVERS,
    KAFKA_CLIENT_PREFIX,
    client_properties,
    require_setting,
)

log = logging.getLogger(__name__)
SILVER_HOURS = 48
KAFKA_TIMEOUT_SECONDS = 5.0  # a scrape must answer within Prometheus's scrape timeout with Kafka gone
RUN_STATUSES = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


@dataclass
class BronzeTotals:
    """Sums over one exchange's Bronze materialisations up to storage id `after`."""

    after: int = 0
    rows: float = 0.0
    bytes: float = 0.0
    commits: int = 0
    commit_seconds: float = 0.0
    offsets: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, metadata: dict) -> None:
        self.rows += metadata["rows"].value if "rows" in metadata else 0
        self.bytes += metadata["bytes"].value if "bytes" in metadata else 0
        self.commits += 1
        self.commit_seconds += metadata["commit_seconds"].value if "commit_seconds" in metadata else 0.0
        for partition, span in (metadata["offsets"].value if "offsets" in metadata else {}).items():
            self.offsets[partition] += span["last"] - span["first"] + 1


class K2Metrics:
    """The collector's source: call `families()` at each scrape."""

    def __init__(self, instance: dg.DagsterInstance, repository: dg.RepositoryDefinition) -> None:
        self.instance, self.repository = instance, repository
        self.bronze = {e.name: BronzeTotals() for e in EXCHANGES}
        self.halts: dict[str, tuple[str, tuple[str, ...]]] = {}  # run id -> (exchange, halting errors)
        self._kafka: tuple[KafkaResource, Consumer] | None = None

    def families(self) -> Iterator[Metric]:
        now = time.time()
        yield from self.ingestion(now)
        yield from self.partition_lag()
        yield from self.halt_events()
        yield from self.silver_hours(now)
        yield from self.freshness(now)
        yield from self.checks()
        yield from self.runs()

    def ingestion(self, now: float) -> Iterator[Metric]:
        labels = ["exchange"]
        rows = CounterMetricFamily("k2_bronze_records_ingested", "Records committed to Bronze", labels=labels)
        size = CounterMetricFamily(
            "k2_bronze_bytes_ingested", "Kafka value bytes committed to Bronze", labels=labels
        )
        latency = SummaryMetricFamily("k2_bronze_commit_seconds", "Bronze commit latency", labels=labels)
        lag = GaugeMetricFamily(
            "k2_bronze_consumer_lag_records", "Records behind Kafka at the newest commit", labels=labels
        )
        age = GaugeMetricFamily(
            "k2_bronze_last_commit_age_seconds", "Seconds since the newest Bronze commit", labels=labels
        )
        halted = GaugeMetricFamily(
            "k2_ingestion_halted", "1 while ingestion waits for a person", labels=labels
        )
        spans = CounterMetricFamily(
            "k2_bronze_partition_offsets_ingested",
            "Kafka offsets committed to Bronze",
            labels=["exchange", "partition"],
        )
        stored = GaugeMetricFamily(
            "k2_bronze_committed_offset",
            "Next offset per partition, as stored in Bronze",
            labels=["exchange", "partition"],
        )
        for exchange in EXCHANGES:
            totals, key = self._bronze_totals(exchange.name), bronze_asset_key(exchange)
            rows.add_metric([exchange.name], totals.rows)
            size.add_metric([exchange.name], totals.bytes)
            latency.add_metric([exchange.name], totals.commits, totals.commit_seconds)
            for partition, count in sorted(totals.offsets.items(), key=lambda kv: int(kv[0])):
                spans.add_metric([exchange.name, partition], count)
            latest = self.instance.get_latest_materialization_event(key)
            if latest is not None:
                value = latest.asset_materialization.metadata.get("consumer_lag")
                lag.add_metric([exchange.name], value.value if value is not None else -1)
                age.add_metric([exchange.name], now - latest.timestamp)
            halted.add_metric([exchange.name], 1 if ingestion_state(self.instance, exchange).halt else 0)
            for partition, offset in sorted(self._stored_offsets(exchange)[0].items()):
                stored.add_metric([exchange.name, str(partition)], offset)
        yield from (rows, size, latency, lag, age, halted, spans, stored)

    def _consumer(self) -> tuple[KafkaResource, Consumer]:
        """One metadata-only consumer for the exporter's life (it never subscribes or commits)."""
        if self._kafka is None:
            kafka = KafkaResource(
                bootstrap_servers=require_setting(KAFKA_BOOTSTRAP_SERVERS),
                client_config=client_properties(KAFKA_CLIENT_PREFIX),
                request_timeout_seconds=KAFKA_TIMEOUT_SECONDS,
            )
            self._kafka = (kafka, kafka.consumer("k2-metrics"))
        return self._kafka

    def partition_lag(self) -> Iterator[Metric]:
        """Per partition: Kafka's high watermark less the next offset Bronze stored (Kafka is asked)."""
        up = GaugeMetricFamily("k2_kafka_up", "1 when the exporter could read Kafka's watermarks", labels=[])
        lag = GaugeMetricFamily(
            "k2_bronze_partition_lag_records",
            "Records in Kafka not yet in Bronze, per partition",
            labels=["exchange", "partition"],
        )
        samples: list[tuple[str, int, int]] = []
        try:
            kafka, consumer = self._consumer()
            for exchange in EXCHANGES:
                stored, stored_topic_id = self._stored_offsets(exchange)
                if stored_topic_id is not None and stored_topic_id != kafka.topic_id(exchange.topic):
                    stored = {}  # a recreated topic: Bronze has none of it (ingestion reports the gap)
                partitions = kafka.partitions(consumer, exchange.topic)
                marks = kafka.watermarks(consumer, exchange.topic, partitions)
                samples += [
                    (exchange.name, p, max(0, high - max(low, stored.get(p, low))))
                    for p, (low, high) in marks.items()
                ]
            up.add_metric([], 1)
        except (KafkaException, RuntimeError) as err:  # unreachable, refused, or not configured
            up.add_metric([], 0)
            log.warning("k2 metrics: no per-partition lag, Kafka is not readable: %s", err)
            samples = []  # no partial figures: all partitions or none
        for exchange, p, records in sorted(samples):
            lag.add_metric([exchange, str(p)], records)
        yield from (up, lag)

    def _stored_offsets(self, exchange: ExchangeConfig) -> tuple[dict[int, int], str | None]:
        """The next offset per partition stored in Bronze, and the id of the topic they belong to."""
        catalog = IcebergCatalogResource().catalog()
        identifier = bronze_table_spec(exchange).identifier
        if not catalog.table_exists(identifier):
            return {}, None
        table = catalog.load_table(identifier)
        return read_stored_offsets(table), read_stored_topic_id(table)

    def _bronze_totals(self, name: str) -> BronzeTotals:
        totals = self.bronze[name]
        key = bronze_asset_key(next(e for e in EXCHANGES if e.name == name))
        while True:
            result = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, after_storage_id=totals.after),
                limit=1000,
                ascending=True,
            )
            for record in result.records:
                totals.add(record.asset_materialization.metadata)
                totals.after = record.storage_id
            if not result.has_more:
                return totals

    def halt_events(self) -> Iterator[Metric]:
        """Fence and gap events: failed ingestion runs whose errors need a person, by error class."""
        family = CounterMetricFamily(
            "k2_ingestion_halt_events",
            "Ingestion runs failed by FencedError/KafkaGapError",
            labels=["exchange", "error"],
        )
        for exchange in EXCHANGES:
            filters = dg.RunsFilter(
                tags={INGESTION_TAG: exchange.name}, statuses=[dg.DagsterRunStatus.FAILURE]
            )
            for record in self.instance.get_run_records(filters):
                run_id = record.dagster_run.run_id
                if run_id not in self.halts:
                    errors = {name for name, _ in failure_errors(self.instance, run_id)} & NEEDS_A_PERSON
                    self.halts[run_id] = (exchange.name, tuple(sorted(errors)))
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for exchange, errors in self.halts.values():
            for error in errors:
                counts[(exchange, error)] += 1
        for exchange in EXCHANGES:
            for error in sorted(NEEDS_A_PERSON):
                family.add_metric([exchange.name, error], counts[(exchange.name, error)])
        yield family

    def _latest_per_partition(self, key: dg.AssetKey, check: str, limit: int) -> dict[str, dict]:
        """Metadata of the newest evaluation per partition (a range run's `start...end` counts as one)."""
        check_key = dg.AssetCheckKey(key, check)
        history = self.instance.event_log_storage.get_asset_check_execution_history(check_key, limit=limit)
        latest: dict[str, dict] = {}
        for record in history:  # newest first
            event = record.event.dagster_event if record.event else None
            if event is None or event.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                continue
            partition = record.partition or run_partition(self.instance, record.run_id)
            if partition and partition not in latest:
                latest[partition] = {k: v.value for k, v in event.event_specific_data.metadata.items()}
        return latest

    def silver_hours(self, now: float) -> Iterator[Metric]:
        labels = ["exchange", "hour"]
        silver = GaugeMetricFamily("k2_silver_rows", "Silver rows of the hour", labels=labels)
        bronze = GaugeMetricFamily(
            "k2_silver_bronze_rows", "Bronze rows the hour's Silver read", labels=labels
        )
        dlq = GaugeMetricFamily("k2_silver_dlq_rows", "DLQ rows of the hour", labels=labels)
        rate = GaugeMetricFamily("k2_silver_dlq_rate", "DLQ rows / Bronze rows of the hour", labels=labels)
        categories = GaugeMetricFamily(
            "k2_silver_dlq_category_rows", "DLQ rows of the hour by category", labels=[*labels, "category"]
        )
        oldest = hour_key(datetime.fromtimestamp(now, UTC) - SILVER_HOURS * HOUR)
        for exchange in EXCHANGES:
            key = silver_asset_key(exchange)
            counts = self._latest_per_partition(key, CONSERVATION, 4 * SILVER_HOURS)
            rates = self._latest_per_partition(key, DLQ_RATE, 4 * SILVER_HOURS)
            for hour in sorted(h for h in counts if h >= oldest):
                silver.add_metric([exchange.name, hour], counts[hour]["silver_rows"])
                bronze.add_metric([exchange.name, hour], counts[hour]["bronze_rows"])
                dlq.add_metric([exchange.name, hour], counts[hour]["dlq_rows"])
            for hour in sorted(h for h in rates if h >= oldest):
                rate.add_metric([exchange.name, hour], rates[hour]["dlq_rate"])
                for name, value in sorted(rates[hour].items()):
                    if name.startswith("dlq_") and name != "dlq_rate":
                        categories.add_metric([exchange.name, hour, name[4:].upper()], value)
        yield from (silver, bronze, dlq, rate, categories)

    def freshness(self, now: float) -> Iterator[Metric]:
        """Age of the newest closed hour: seconds since the end of the newest materialised hour that ended."""
        family = GaugeMetricFamily(
            "k2_newest_closed_hour_age_seconds",
            "Seconds since the end of the newest closed hour that is materialised",
            labels=["layer", "asset"],
        )
        keys = [("silver", silver_asset_key(e)) for e in EXCHANGES] + [("gold", GOLD_KEY)]
        for layer, key in keys:
            ends = [
                (hour_start(p) + HOUR).timestamp() for p in self.instance.get_materialized_partitions(key)
            ]
            closed = [end for end in ends if end <= now]
            if closed:
                family.add_metric([layer, key.to_user_string()], now - max(closed))
        yield family

    def checks(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "k2_asset_check_failing",
            "1 when the newest evaluation of an ERROR asset check failed",
            labels=["asset", "check"],
        )
        keys = sorted(self.repository.asset_graph.asset_check_keys, key=lambda k: k.to_user_string())
        latest = self.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
        for key in keys:
            record = latest.get(key)
            event = record.event.dagster_event if record and record.event else None
            evaluation = (
                event.event_specific_data
                if event and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                else None
            )
            if evaluation is None:
                continue
            failing = not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
            family.add_metric([key.asset_key.to_user_string(), key.name], 1 if failing else 0)
        yield family

    def runs(self) -> Iterator[Metric]:
        """Runs by job and outcome, the newest run's duration, and the maintenance jobs' last success."""
        total = CounterMetricFamily("k2_runs", "Finished runs by job and status", labels=["job", "status"])
        duration = GaugeMetricFamily(
            "k2_run_last_duration_seconds", "Duration of the newest finished run", labels=["job"]
        )
        last_success = GaugeMetricFamily(
            "k2_maintenance_last_success_timestamp_seconds",
            "When the newest successful run of a maintenance job ended",
            labels=["job"],
        )
        maintenance_failed = GaugeMetricFamily(
            "k2_maintenance_last_run_failed",
            "1 when the newest finished run of a maintenance job failed",
            labels=["job"],
        )
        for job in sorted(self.repository.get_all_jobs(), key=lambda j: j.name):
            for status in RUN_STATUSES:
                count = self.instance.get_runs_count(dg.RunsFilter(job_name=job.name, statuses=[status]))
                total.add_metric([job.name, status.value], count)
            newest = self.instance.get_run_records(
                dg.RunsFilter(job_name=job.name, statuses=list(RUN_STATUSES)), limit=1
            )
            if newest and newest[0].start_time and newest[0].end_time:
                duration.add_metric([job.name], newest[0].end_time - newest[0].start_time)
            if MAINTENANCE_TAG not in job.tags:
                continue
            if newest:
                failed = newest[0].dagster_run.status == dg.DagsterRunStatus.FAILURE
                maintenance_failed.add_metric([job.name], 1 if failed else 0)
            success = self.instance.get_run_records(
                dg.RunsFilter(job_name=job.name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
            )
            if success and success[0].end_time:
                last_success.add_metric([job.name], success[0].end_time)
        yield from (total, duration, last_success, maintenance_failed)
