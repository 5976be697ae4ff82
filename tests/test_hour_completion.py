"""Show it: two simulated days with nobody watching, and every closed Gold hour ends equal to the
distinct valid Silver trades of its event hour, without any manual backfill.

Only Dagster's automation evaluator (with simulated evaluation times, against a real instance) and
K2's sensors decide what runs; the test executes exactly what they request, in process, on a real
SQLite Iceberg catalog, with Bronze written as ingestion writes it. Every hour a run is in progress
at both completion ticks: Silver H's 55-minute refresh is still running at H+1:05, and a refresh of
Silver H+1 is running at H+1:10 when Gold H is due. Trades arrive 10 min, 50 min, 6 h and 3 days
after their hour; some are delivered twice; a DLQ replay recovers rows of an old hour; an operator
re-runs an old Silver hour with wider rules; and one late batch holds trades of 150 event hours.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from k2_assets.definitions import defs
from k2_assets.gold.assets import GOLD_KEY
from k2_assets.gold.tables import GOLD_TABLE_SPEC
from k2_assets.partitions import hour_key as key
from k2_assets.silver.tables import silver_table_spec
from k2_resources.exchanges import EXCHANGES, exchange
from tests.lakehouse_helpers import Lakehouse, lakehouse
from tests.pipeline_helpers import materialize
from tests.test_automation import SILVER_BINANCE, end, start_run

START = datetime(2026, 11, 20, tzinfo=UTC)
HOURS = 48
END = START + timedelta(hours=HOURS)
BINANCE, KRAKEN = exchange("binance"), exchange("kraken")
SILVER_KEYS = [k for e in EXCHANGES for k in (f"silver_{e.name}_trades", f"silver_dlq_trades/{e.name}")]
ALL_KEYS = {dg.AssetKey.from_user_string(k) for k in SILVER_KEYS} | {GOLD_KEY}
WIDER_SKEW = {"max_future_skew_seconds": 3600.0}  # the "fix": producer clocks up to an hour ahead
REPLAYED_HOUR = START + timedelta(hours=3)
RERUN_HOUR = START + timedelta(hours=5)


class Simulation:
    """Simulated time, the trades that arrive as it passes, and the automation driving the pipeline."""

    def __init__(self, instance: dg.DagsterInstance, lake: Lakehouse):
        self.instance, self.lake = instance, lake
        self.arrivals: list[tuple[datetime, str, list[datetime], str]] = []  # ingested, exchange, trade times
        self.valid: dict[str, str] = {}  # message_id -> event hour key, of every trade that must reach Gold
        self.recoverable: dict[str, str] = {}  # valid only with WIDER_SKEW: DLQ first
        self.sent: dict[tuple[str, datetime], bytes] = {}  # (exchange, trade time) -> Kafka value
        self.cursor = None
        self.sensor_cursor: str | None = None
        self.runs = 0
        self.requested_late: list[str] = []

    def arrive(self, ingested: datetime, ex: str, traded: list[datetime], kind: str = "valid") -> None:
        self.arrivals.append((ingested, ex, traded, kind))

    def advance(self, now: datetime) -> None:
        """Ingest into Bronze everything that has arrived by `now`."""
        due = sorted((a for a in self.arrivals if a[0] <= now), key=lambda a: a[0])
        self.arrivals = [a for a in self.arrivals if a[0] > now]
        for ingested, ex, traded, kind in due:
            if kind == "redelivery":  # the same Kafka value again (a producer retry): Gold keeps one
                values = [(self.sent[(ex, moment)], moment) for moment in traded]
                self.lake.ingest(exchange(ex), values, ingested)
                continue
            records = [self.lake.trade(exchange(ex), moment) for moment in traded]
            values = [(self.lake.framed(exchange(ex), r), r["timestamp"]) for r in records]
            self.lake.ingest(exchange(ex), values, ingested)
            target = self.valid if kind == "valid" else self.recoverable
            for record, (value, moment) in zip(records, values, strict=True):
                target[record["message_id"]] = key(moment.replace(minute=0, second=0, microsecond=0))
                self.sent[(ex, moment)] = value

    def evaluate(self, at: datetime) -> dict[str, set[dg.AssetKey]]:
        self.advance(at)
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=self.instance, evaluation_time=at, cursor=self.cursor
        )
        self.cursor = result.cursor
        wanted: dict[str, set[dg.AssetKey]] = defaultdict(set)
        for asset in ALL_KEYS:
            for partition in result.get_requested_partitions(asset):
                wanted[partition].add(asset)
        return wanted

    def run(self, partition: str, keys: set[dg.AssetKey], **config) -> None:
        """One run materialising `keys` for `partition` (Silver ops given `config`, if any)."""
        ops = {f"silver_{e.name}" for e in EXCHANGES if dg.AssetKey(f"silver_{e.name}_trades") in keys}
        kwargs = {"run_config": {"ops": {op: {"config": config} for op in ops}}} if config else {}
        result = materialize(self.instance, sorted(keys, key=str), partition, **kwargs)
        assert result.success, partition
        self.runs += 1

    def execute(self, wanted: dict[str, set[dg.AssetKey]]) -> None:
        for partition, keys in sorted(wanted.items()):
            self.run(partition, keys)

    def sensors(self) -> None:
        """Late-data sensor ticks until it has nothing more to ask, each request executed."""
        sensor = defs.get_sensor_def("gold_late_data_sensor")
        for _ in range(10):
            context = dg.build_sensor_context(
                instance=self.instance, cursor=self.sensor_cursor, repository_def=defs.get_repository_def()
            )
            result = sensor.evaluate_tick(context)
            self.sensor_cursor = result.cursor
            if not result.run_requests:
                return
            for request in result.run_requests:
                self.requested_late.append(request.partition_key)
                self.run(request.partition_key, {GOLD_KEY})
        raise AssertionError("the late-data sensor kept asking")

    def hour(self, h: datetime) -> None:
        """One hour of the pipeline, with runs in progress at both completion ticks."""
        n, h_key, n_key = h + timedelta(hours=1), key(h), key(h + timedelta(hours=1))
        # Silver H's :55 refresh reads Bronze now, and its run is still in progress at the :05 tick.
        wanted = self.evaluate(h + timedelta(minutes=55, seconds=30))
        assert wanted[h_key] >= SILVER_BINANCE
        self.execute(wanted)
        refresh = start_run(self.instance, SILVER_BINANCE, h_key)

        wanted = self.evaluate(n + timedelta(minutes=5, seconds=30))
        assert not SILVER_BINANCE & wanted.get(h_key, set()), "requested while its refresh runs"
        self.execute(wanted)
        end(self.instance, refresh)

        wanted = self.evaluate(n + timedelta(minutes=6))
        assert wanted[h_key] >= SILVER_BINANCE, "Silver H not completed once quiet"
        self.execute(wanted)

        silver_n = start_run(self.instance, SILVER_BINANCE, n_key)  # Silver H+1 running at the :10 tick
        wanted = self.evaluate(n + timedelta(minutes=10, seconds=30))
        assert GOLD_KEY not in wanted.get(h_key, set()), "Gold H requested while Silver H+1 is written"
        self.execute(wanted)
        self.run(n_key, SILVER_BINANCE)  # that run's work; it ends before the next tick
        end(self.instance, silver_n)

        wanted = self.evaluate(n + timedelta(minutes=11))
        assert GOLD_KEY in wanted[h_key], "Gold H not completed once Silver was quiet"
        self.execute(wanted)
        self.sensors()


def plan_trades(sim: Simulation) -> None:
    """Trades on time every hour, late ones of every kind, and the rows for the replay and the re-run."""
    for i in range(HOURS):
        h = START + timedelta(hours=i)
        for ex, minutes in (("binance", (5, 20, 40)), ("kraken", (15, 45))):
            for m in minutes:
                sim.arrive(h + timedelta(minutes=m, seconds=2), ex, [h + timedelta(minutes=m)])
        # In the hour's last minute, after its :55 refresh: only the completion can pick it up.
        sim.arrive(h + timedelta(minutes=59, seconds=40), "binance", [h + timedelta(minutes=59, seconds=30)])
        if i % 4 == 0:
            n = h + timedelta(hours=1)
            sim.arrive(n + timedelta(minutes=10), "kraken", [h + timedelta(minutes=59, seconds=50)])  # 10 min
            sim.arrive(n + timedelta(minutes=50), "binance", [h + timedelta(minutes=30)])  # 50 min
            if h + timedelta(hours=7) < END:
                sim.arrive(h + timedelta(hours=7, minutes=25), "binance", [h + timedelta(minutes=12)])  # 6 h
        if i % 8 == 1:  # a redelivery of the hour's first trade, two hours later
            sim.arrive(
                h + timedelta(hours=2, minutes=3), "binance", [h + timedelta(minutes=5)], kind="redelivery"
            )
        if i < 24 and i % 6 == 0:  # 3 days late: hours from before the simulation started
            sim.arrive(h + timedelta(minutes=33), "kraken", [h - timedelta(days=3) + timedelta(minutes=7)])
    for hour, ex in ((REPLAYED_HOUR, "binance"), (RERUN_HOUR, "kraken")):
        # Trade times 20 min after ingestion: DLQ (VALIDATION_TIMESTAMP) under the default 5 min skew.
        ingested = hour + timedelta(minutes=25)
        sim.arrive(ingested, ex, [ingested + timedelta(minutes=20)], kind="recoverable")
        # Enough trades beside it that the hour's DLQ rate (1 in 41) stays under the 5 % fail rate.
        sim.arrive(ingested, ex, [ingested - timedelta(seconds=s) for s in range(40)])
    batch = END - timedelta(hours=4, minutes=30)  # one late batch: trades of 150 event hours
    sim.arrive(batch, "binance", [START - timedelta(hours=150 - i, minutes=-17) for i in range(150)])


def operator_actions(sim: Simulation, h: datetime) -> None:
    """What people do during the two days: each is followed only by automation and sensors."""
    if h == START + timedelta(hours=30):  # re-run an old Silver hour with the widened rule
        sim.run(
            key(RERUN_HOUR),
            {dg.AssetKey("silver_kraken_trades"), dg.AssetKey(["silver_dlq_trades", "kraken"])},
            **WIDER_SKEW,
        )
    if h == START + timedelta(hours=36):  # replay the DLQ after the same fix
        config = {
            "ops": {"replay_dlq_rows": {"config": {"categories": ["VALIDATION_TIMESTAMP"], **WIDER_SKEW}}}
        }
        assert (
            defs.resolve_job_def("silver_dlq_replay")
            .execute_in_process(run_config=config, instance=sim.instance)
            .success
        )
    sim.sensors()


def gold_ids_by_hour(lake: Lakehouse) -> dict[str, set[str]]:
    gold = (
        lake.iceberg.load_table(GOLD_TABLE_SPEC).scan(selected_fields=("message_id", "timestamp")).to_arrow()
    )
    by_hour: dict[str, set[str]] = defaultdict(set)
    for message_id, micros in zip(gold["message_id"].to_pylist(), gold["timestamp"].to_pylist(), strict=True):
        by_hour[
            key(datetime.fromtimestamp(micros / 1e6, UTC).replace(minute=0, second=0, microsecond=0))
        ].add(message_id)
    return by_hour


def silver_ids_by_hour(lake: Lakehouse) -> dict[str, list[str]]:
    by_hour: dict[str, list[str]] = defaultdict(list)
    for ex in EXCHANGES:
        silver = lake.iceberg.load_table(silver_table_spec(ex)).scan(
            selected_fields=("message_id", "timestamp")
        )
        rows = silver.to_arrow()
        for message_id, micros in zip(
            rows["message_id"].to_pylist(), rows["timestamp"].to_pylist(), strict=True
        ):
            by_hour[
                key(datetime.fromtimestamp(micros / 1e6, UTC).replace(minute=0, second=0, microsecond=0))
            ].append(message_id)
    return by_hour


@pytest.mark.timeout(3600)
def test_two_days_unattended_every_closed_gold_hour_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with lakehouse(tmp_path / "k2home", monkeypatch) as lake, dg.DagsterInstance.ephemeral() as instance:
        sim = Simulation(instance, lake)
        plan_trades(sim)
        sim.execute(sim.evaluate(START + timedelta(minutes=48)))  # the evaluator's first look: a baseline
        for i in range(HOURS):
            h = START + timedelta(hours=i)
            sim.hour(h)
            operator_actions(sim, h)
        assert not sim.arrivals, "every planned trade was ingested"

        gold, silver = gold_ids_by_hour(lake), silver_ids_by_hour(lake)
        # Every closed Gold hour = the distinct valid Silver trades of its event hour.
        redelivered = sum(len(ids) - len(set(ids)) for ids in silver.values())
        assert redelivered == len(range(1, HOURS, 8))  # Silver keeps both copies, Gold one
        assert set(gold) == set(silver)
        for hour in silver:
            assert gold[hour] == set(silver[hour]), hour
        # And those are exactly the valid trades that arrived, late ones and recovered ones included.
        expected: dict[str, set[str]] = defaultdict(set)
        for message_id, hour in {**sim.valid, **sim.recoverable}.items():
            expected[hour].add(message_id)
        assert gold == expected
        late_hours = {key(START - timedelta(hours=150 - i)) for i in range(150)}
        assert late_hours <= set(gold)
        total = sum(len(ids) for ids in gold.values())
        print(
            f"{HOURS} h simulated: {sim.runs} runs requested by automation and sensors, "
            f"{len(sim.requested_late)} by the late-data sensor; {len(gold)} Gold hours, {total} trades"
        )
