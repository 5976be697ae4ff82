"""Benchmark: exactly-once Kafka -> Bronze ingestion, records/s and peak RSS, against the broker's own rate.

On a dev stack of its own (a real Apache Kafka broker + Schema Registry in a temporary K2_HOME, SQLite
catalog) it runs `k2 ingest --exchange binance` as a child process, long-running, and produces `--records`
real V2 trades (~160-byte Confluent-framed Avro, round-robin over the topic's 4 partitions) while it runs.

The producer is throttled on Bronze's own progress (the consumer-group offsets `k2-bronze-<exchange>`
that ingestion mirrors after each Iceberg commit): it never has more than `--max-ahead` records per
partition beyond what Bronze committed, so the figure is ingestion's sustained pace with a backlog of a
known size, not the time to drain a topic filled beforehand. Ingestion's batch size must stay below that
window, or it would wait for records the producer may not send. (The dev broker keeps records by time,
72 h, so the window is a choice, not a retention limit as with the old mock broker's ~5 MB per partition.)

The machine is shared, so wall-clock rates swing with its load; CPU per record is the steadier figure.
Ingestion's is read from the kernel's counters of the child (/proc, user + system, all its threads) at
its first and last Iceberg commit, so process start is not in it; the plain consumer's from getrusage
of this process around its reads (librdkafka's threads included, nothing else running then).

Once every record is committed the child is stopped, and the benchmark checks Bronze holds exactly N rows,
(partition, offset) unique and contiguous from 0 in every partition, and the offsets stored in the last
Iceberg commit equal the high watermarks. Then, for comparison, a plain confluent_kafka Consumer reads
the same number of records from the same broker (re-reading the retained window as often as needed).

    .venv/bin/python bench/bench_bronze_ingest.py [--records 1000000] [--max-batch-records 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from bench._common import Child, ChildResult, FramedTrade, framed_trades, k2_child_env, private_stack  # noqa: E402

POOL_RECORDS = 20_000  # distinct records built once and cycled: building 1M would cost the producer a core
MONITOR_SECONDS = 0.05
STALL_SECONDS = 300  # a loaded machine (load 20-30) has taken over 120 s to start the child
MIN_STEADY_COMMITS = 10
PARTITIONS = 4


@dataclass
class Progress:
    """Committed Bronze offsets over time, as the consumer group shows them, with the child's CPU then."""

    started: float = field(default_factory=time.perf_counter)
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, committed, CPU s)

    def add(self, committed: int, cpu_seconds: float) -> None:
        if not self.samples or committed != self.samples[-1][1]:
            self.samples.append((time.perf_counter() - self.started, committed, cpu_seconds))

    def sustained(self) -> tuple[float, float, float]:
        """(records/s, seconds, CPU us per record) from the first commit to the last: start-up excluded."""
        (t0, c0, cpu0), (t1, c1, cpu1) = next(s for s in self.samples if s[1] > 0), self.samples[-1]
        rate = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
        return rate, t1 - t0, ((cpu1 - cpu0) / (c1 - c0) * 1e6 if c1 > c0 else 0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process so far (all its threads), from the kernel's counters."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


class ThrottledProducer(threading.Thread):
    """Produces `total` records round-robin, never more than `max_ahead` per partition beyond `committed`."""

    def __init__(self, bootstrap: str, topic: str, pool: list[FramedTrade], total: int, max_ahead: int):
        super().__init__(name="throttled-producer", daemon=True)
        config = {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True}
        self.producer = Producer(config)
        self.topic, self.pool, self.total, self.max_ahead = topic, pool, total, max_ahead
        self.sent = [0] * PARTITIONS
        self.committed = [0] * PARTITIONS  # written by the monitor loop
        self.waited_seconds = 0.0
        self.error: BaseException | None = None
        self.stopping = threading.Event()  # set by the main thread when the benchmark ends or fails

    def run(self) -> None:
        try:
            for i in range(self.total):
                if self.stopping.is_set():
                    return
                self._send(i % PARTITIONS, self.pool[i % len(self.pool)])
            self.producer.flush(60)
        except BaseException as err:  # reported by the main thread, which owns the benchmark's outcome
            self.error = err

    def _send(self, partition: int, record: FramedTrade) -> None:
        if self.sent[partition] - self.committed[partition] >= self.max_ahead:
            waited = time.perf_counter()
            while self.sent[partition] - self.committed[partition] >= self.max_ahead:
                if self.stopping.is_set():
                    return
                self.producer.poll(0.002)
            self.waited_seconds += time.perf_counter() - waited
        produce_record(self.producer, self.topic, partition, record)
        self.sent[partition] += 1
        if self.sent[partition] % 1000 == 0:
            self.producer.poll(0)


def produce_record(producer: Producer, topic: str, partition: int, record: FramedTrade) -> None:
    """Hand one record to the producer, waiting for room while its local queue is full."""
    while True:
        try:
            producer.produce(
                topic, record.value, key=record.key, partition=partition, timestamp=record.timestamp_ms
            )
            return
        except BufferError:
            producer.poll(0.01)


def committed_offsets(consumer: Consumer, topic: str) -> list[int]:
    """The consumer group's committed offset per partition (0 where nothing is committed yet)."""
    offsets = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    return [max(0, tp.offset) for tp in sorted(offsets, key=lambda tp: tp.partition)]


def ingestion_command(exchange: str, max_batch: int, commit_interval: float) -> list[str]:
    """`k2 ingest` with the benchmark's batch and commit interval, its flags named after the Config's fields."""
    from k2_assets.cli.jobs import flag

    settings = {"max_batch_records": max_batch, "commit_interval_seconds": commit_interval}
    settings["max_runtime_seconds"] = 24 * 3600  # long-running: the benchmark stops it
    flags = [part for name, value in settings.items() for part in (flag(name), str(value))]
    return [sys.executable, "-m", "k2_assets.cli", "ingest", "--exchange", exchange, *flags]


@dataclass(frozen=True)
class IngestionRun:
    """What one benchmarked ingestion run cost and how it progressed."""

    result: ChildResult
    progress: Progress
    sent: list[int]  # records produced per partition
    producer_waited_seconds: float  # time the producer spent waiting for Bronze commits


def run_ingestion(
    home: Path, bootstrap: str, args: argparse.Namespace, pool: list[FramedTrade]
) -> IngestionRun:
    """Start ingestion, produce under throttle until Bronze committed every record, then stop ingestion."""
    from k2_resources.exchanges import exchange

    config = exchange(args.exchange)
    child = Child(
        ingestion_command(config.name, args.max_batch_records, args.commit_interval_seconds),
        k2_child_env(home),
    )
    producer = ThrottledProducer(bootstrap, config.topic, pool, args.records, args.max_ahead)
    group = Consumer({"bootstrap.servers": bootstrap, "group.id": config.consumer_group})
    progress = Progress()
    producer.start()
    try:
        watch(child, producer, group, progress, args.records)
        return IngestionRun(child.stop(), progress, producer.sent, producer.waited_seconds)
    finally:
        group.close()
        producer.stopping.set()
        if child.process.returncode is None:
            child.stop(grace=5.0)
        producer.join(timeout=60)


def watch(
    child: Child, producer: ThrottledProducer, group: Consumer, progress: Progress, records: int
) -> None:
    """Feed Bronze's committed offsets to the producer until all `records` are committed.

    Fails fast when ingestion exits, the producer fails, or no commit lands for STALL_SECONDS (a record
    that never arrives would otherwise keep the benchmark waiting forever).
    """
    last_progress = time.monotonic()
    while True:
        producer.committed = committed_offsets(group, producer.topic)
        committed = sum(producer.committed)
        if not progress.samples or committed != progress.samples[-1][1]:
            last_progress = time.monotonic()
        progress.add(committed, cpu_seconds(child.pid))
        if committed >= records:
            return
        if producer.error is not None:
            raise RuntimeError(f"producer failed: {producer.error}")
        if (ended := child.poll()) is not None:
            raise RuntimeError(f"ingestion exited early ({ended.returncode}):\n{ended.stderr[-4000:]}")
        if time.monotonic() - last_progress > STALL_SECONDS:
            raise RuntimeError(
                f"no Bronze commit for {STALL_SECONDS} s at {committed:,} of {records:,} records"
            )
        time.sleep(MONITOR_SECONDS)


def verify_bronze(exchange_name: str, sent: list[int]) -> None:
    """Bronze holds each produced record exactly once: N rows, (partition, offset) unique and 0..sent-1."""
    import pyarrow.compute as pc

    from k2_assets.bronze.ingestion import read_stored_offsets
    from k2_assets.bronze.tables import bronze_table_spec
    from k2_resources.exchanges import exchange
    from k2_resources.iceberg import IcebergCatalogResource

    table = IcebergCatalogResource().load_table(bronze_table_spec(exchange(exchange_name)))
    rows = table.scan(selected_fields=("partition", "offset")).to_arrow()
    problems = []
    if rows.num_rows != sum(sent):
        problems.append(f"{rows.num_rows} rows, expected {sum(sent)}")
    for p, count in enumerate(sent):
        offsets = rows.filter(pc.equal(rows["partition"], p))["offset"]
        distinct = pc.count_distinct(offsets).as_py()
        bounds = pc.min_max(offsets).as_py() if len(offsets) else {"min": None, "max": None}
        if not (len(offsets) == distinct == count and bounds == {"min": 0, "max": count - 1}):
            problems.append(
                f"partition {p}: {len(offsets)} rows, {distinct} distinct offsets, {bounds}, sent {count}"
            )
    stored = read_stored_offsets(table)
    if stored != dict(enumerate(sent)):
        problems.append(f"stored offsets {stored} != produced {sent}")
    if problems:
        raise RuntimeError("Bronze is not exactly the produced records: " + "; ".join(problems))


@dataclass(frozen=True)
class PlainConsume:
    """What a plain consumer achieved reading the same records from the same broker."""

    streaming_rate: float  # records/s from each pass's first record to its last
    overall_rate: float  # records/s including each pass's assign and first fetch
    cpu_us_per_record: float  # this process (the consumer and librdkafka's threads)
    passes: int
    retained: int


def broker_consume_rate(bootstrap: str, topic: str, total: int) -> PlainConsume:
    """How fast a plain confluent_kafka Consumer reads `total` records, touching each value.

    Where the broker no longer holds all N records (the old mock broker kept ~5 MB a partition) the same
    volume is read as repeated passes over what it holds. The streaming rate counts from each pass's
    first record to its last (the broker streaming to a client); the overall rate also counts the wait
    for the first fetch after each assign, a cost ingestion pays once per run, not per record.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "k2-bench-plain", "enable.auto.commit": False}
    )
    marks = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in range(PARTITIONS)]
    per_pass = sum(high - low for low, high in marks)
    read, passes, streaming, overall = 0, 0, 0.0, 0.0
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        while read < total:
            assigned = time.perf_counter()
            consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in enumerate(marks)])
            got, first = read_pass(consumer, min(per_pass, total - read))
            finished = time.perf_counter()
            streaming, overall = streaming + finished - first, overall + finished - assigned
            read, passes = read + got, passes + 1
    finally:
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        consumer.close()
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return PlainConsume(read / streaming, read / overall, cpu / read * 1e6, passes, per_pass)


def read_pass(consumer: Consumer, wanted: int) -> tuple[int, float]:
    """Consume `wanted` records; returns how many and when the first one arrived (perf_counter)."""
    got, first = 0, 0.0
    while got < wanted:
        for message in consumer.consume(num_messages=min(10_000, wanted - got), timeout=5):
            if message.error() is None and message.value() is not None:
                first = first or time.perf_counter()
                got += 1
    return got, first


def report(args: argparse.Namespace, pool: list[FramedTrade], run: IngestionRun, plain: PlainConsume) -> None:
    result, progress = run.result, run.progress
    rate, seconds, cpu_per_record = progress.sustained()
    commits = sum(1 for _, committed, _ in progress.samples if committed > 0)
    steady = "" if commits >= MIN_STEADY_COMMITS else f" - only {commits} commits seen: not a steady rate"
    end_to_end = progress.samples[-1][0]
    size = sum(len(r.value) for r in pool) / len(pool)
    print(
        f"Bronze ingestion of {args.records:,} records (mean value {size:.0f} bytes), verified exactly once:\n"
        f"  sustained {rate:,.0f} records/s (first to last Iceberg commit, {seconds:.1f} s{steady}), "
        f"{cpu_per_record:.2f} us CPU per record; "
        f"{args.records / end_to_end:,.0f} records/s end to end incl. process start ({end_to_end:.1f} s)\n"
        f"  peak RSS of the ingestion process {result.peak_rss_mb:,.0f} MB; its CPU {result.cpu_seconds:.1f} s "
        f"incl. start ({args.records / result.cpu_seconds:,.0f} records per CPU-second)\n"
        f"  settings: max_batch_records {args.max_batch_records:,}, commit_interval_seconds "
        f"{args.commit_interval_seconds}, producer at most {args.max_ahead:,} records/partition ahead of "
        f"Bronze (it waited {run.producer_waited_seconds:.1f} s for commits)\n"
        f"  plain confluent_kafka Consumer, same broker, same records, after ingestion "
        f"({plain.passes} passes over the {plain.retained:,} it retains): {plain.streaming_rate:,.0f} records/s "
        f"first to last record, {plain.overall_rate:,.0f} records/s incl. each pass's assign and first fetch, "
        f"{plain.cpu_us_per_record:.2f} us CPU per record\n"
        f"  ratio Bronze / plain consumer: {rate / plain.streaming_rate:.2f} sustained vs streaming, "
        f"{args.records / end_to_end / plain.overall_rate:.2f} end to end vs overall; "
        f"CPU per record {cpu_per_record / plain.cpu_us_per_record:.1f}x the plain consumer's"
    )


def parse_args() -> argparse.Namespace:
    from k2_assets.bronze.ingestion import BronzeIngestionConfig
    from k2_assets.cli.jobs import flag

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--exchange", default="binance")
    # The benchmark's own ingestion settings, not BronzeIngestionConfig's defaults (100,000 records, the
    # exchange's 10-30 s): small, frequent commits under a bounded backlog (bench/README.md). Flag names
    # and descriptions are the Config's.
    for name, value in (("max_batch_records", 20_000), ("commit_interval_seconds", 1.0)):
        info = BronzeIngestionConfig.model_fields[name]
        parser.add_argument(flag(name), type=type(value), default=value, help=info.description)
    parser.add_argument(
        "--max-ahead",
        type=int,
        default=20_000,
        help="records per partition the producer may be ahead of Bronze (above max-batch-records / 4)",
    )
    args = parser.parse_args()
    if args.max_batch_records >= args.max_ahead * PARTITIONS:
        parser.error("--max-batch-records must be below --max-ahead x 4: a full batch could never be read")
    return args


def main() -> None:
    args = parse_args()
    from k2_resources.exchanges import exchange

    topic = exchange(args.exchange).topic
    load = os.getloadavg()[0]
    print(
        f"bench_bronze_ingest on {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load {load:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="k2-bench-bronze-") as tmp, private_stack(Path(tmp)) as info:
        schema_id = info.schema_ids[f"{topic}-value"]
        first_trade = datetime.now(UTC) - timedelta(hours=1)
        pool = framed_trades(POOL_RECORDS, schema_id, first_trade, timedelta(milliseconds=100))
        run = run_ingestion(Path(tmp), info.bootstrap_servers, args, pool)
        verify_bronze(args.exchange, run.sent)
        plain = broker_consume_rate(info.bootstrap_servers, topic, args.records)
        report(args, pool, run, plain)


if __name__ == "__main__":
    main()
