"""Gold end to end: redeliveries dropped, late trades reach their hour through the sensor, the two-stage
dedup removes replays (also when killed between its stages), dry runs change nothing, backfills repeat."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest
import yaml

from k2_assets.definitions import defs
from k2_assets.gold.sensors import gold_late_data_sensor
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.silver.tables import silver_table_spec
from k2_assets.tables import all_table_specs
from k2_resources.dev.simulator import produce
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource
from tests.conftest import k2
from tests.pipeline_helpers import (
    build_silver,
    check_results,
    comparable,
    hour_key,
    hours_back,
    materialize,
    run_job,
    running_stack,
    table_rows,
    this_hour,
)

# What Gold must handle (late, redelivered and replayed trades), plus a few records for the DLQ: under the
# DLQ fail rate, whose blocking check would otherwise stop Silver (tests/test_silver.py covers that).
GOLD_FAULTS = "late_trade=0.02,redelivery=0.02,replay_new_id=0.02,bad_magic=0.005,nonpositive_price=0.005"
NORMAL_HOURS = 4  # the simulated trades span the last 3 hours; late trades run 6-7 hours behind


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Three hours of trades of both exchanges with every fault kind, through Silver and Gold once."""
    with running_stack(tmp_path_factory.mktemp("gold") / "k2home") as home:
        reports = {
            "binance": produce("binance", 2000, rate=0.2, start="-3h", faults=GOLD_FAULTS, seed=21),
            "kraken": produce("kraken", 1000, rate=0.1, start="-3h", faults=GOLD_FAULTS, seed=22),
        }
        now = datetime.now(UTC)  # the tests' window, fixed: an hour boundary mid-module must not shift it
        with dg.DagsterInstance.ephemeral() as instance:
            assert build_silver(instance).success
            gold = materialize(
                instance, ["gold_crypto_trades"], hours_back(NORMAL_HOURS - 1, now), this_hour(now)
            )
            yield {"home": home, "reports": reports, "instance": instance, "gold_result": gold, "now": now}


def ids(reports: dict, kind: str) -> set[str]:
    return {m for r in reports.values() for m in r["message_ids"][kind]}


def test_gold_has_every_trade_once_and_no_redelivery_twice(scenario: dict) -> None:
    gold = table_rows(GOLD_TABLE_SPEC)
    message_ids = gold["message_id"].to_pylist()
    assert len(message_ids) == len(set(message_ids))
    redelivered = ids(scenario["reports"], "redelivery")
    assert redelivered and redelivered <= set(message_ids)
    silver_ids = set()
    for e in EXCHANGES:
        silver = table_rows(silver_table_spec(e))
        in_window = pc.greater_equal(
            silver["timestamp"], micros(hours_back(NORMAL_HOURS - 1, scenario["now"]))
        )
        silver_ids |= set(silver.filter(in_window)["message_id"].to_pylist())
    assert set(message_ids) == silver_ids  # every valid trade of the window, once
    for row in gold.slice(0, 200).to_pylist():
        hour = datetime.fromtimestamp(row["timestamp"] / 1e6, UTC)
        assert (row["exchange_date"], row["exchange_hour"]) == (hour.date(), hour.hour)
    checks = check_results(scenario["gold_result"])
    assert checks[("gold_crypto_trades", "no_duplicate_message_id")].passed
    assert checks[("gold_crypto_trades", "rows_equal_distinct_silver_trades")].passed


def micros(key: str) -> int:
    return int(datetime.strptime(key, "%Y-%m-%d-%H:00").replace(tzinfo=UTC).timestamp() * 1_000_000)


def test_late_trades_reach_their_gold_hour_through_the_sensor(scenario: dict) -> None:
    late = ids(scenario["reports"], "late_trade")
    assert late and not late & set(table_rows(GOLD_TABLE_SPEC)["message_id"].to_pylist())
    context = dg.build_sensor_context(instance=scenario["instance"], repository_def=defs.get_repository_def())
    result = gold_late_data_sensor(context)
    requested = sorted(r.partition_key for r in result.run_requests)
    # Gold was computed, after Silver, for the last NORMAL_HOURS hours: the sensor asks for exactly the
    # other event hours Silver holds trades for (the late trades' hours), and not for the running hour.
    gold_computed = {hours_back(i, scenario["now"]) for i in range(NORMAL_HOURS)}
    silver_hours = set()
    for e in EXCHANGES:
        for ts in table_rows(silver_table_spec(e))["timestamp"].to_pylist():
            silver_hours.add(hour_key(datetime.fromtimestamp(ts / 1e6, UTC)))
    assert set(requested) == silver_hours - gold_computed and requested
    assert not set(requested) & {this_hour()}
    for key in requested:
        assert materialize(scenario["instance"], ["gold_crypto_trades"], key).success
    gold = table_rows(GOLD_TABLE_SPEC)
    assert late <= set(gold["message_id"].to_pylist())
    for row in gold.filter(pc.is_in(gold["message_id"], value_set=list_of(late))).to_pylist():
        assert hour_key(datetime.fromtimestamp(row["timestamp"] / 1e6, UTC)) in requested
        assert datetime.now(UTC) - datetime.fromtimestamp(row["timestamp"] / 1e6, UTC) > timedelta(hours=5)
    again = gold_late_data_sensor(
        dg.build_sensor_context(
            instance=scenario["instance"], cursor=result.cursor, repository_def=defs.get_repository_def()
        )
    )
    assert not again.run_requests  # Gold now read every change: nothing is requested twice


def list_of(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values))


def test_backfilling_gold_twice_leaves_it_identical(scenario: dict) -> None:
    first = comparable(table_rows(GOLD_TABLE_SPEC), ["message_id"])
    for _ in range(2):
        assert materialize(
            scenario["instance"],
            ["gold_crypto_trades"],
            hours_back(9, scenario["now"]),
            this_hour(scenario["now"]),
        ).success
        assert comparable(table_rows(GOLD_TABLE_SPEC), ["message_id"]).equals(first)


def snapshot_ids() -> dict[str, int | None]:
    catalog = IcebergCatalogResource()
    out = {}
    for spec in all_table_specs():
        snapshot = catalog.ensure_table(spec).current_snapshot()
        out[spec.name] = snapshot.snapshot_id if snapshot else None
    return out


def dedup_config(home: Path, dry_run: bool) -> Path:
    path = home / f"dedup-{dry_run}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"ops": {"find_gold_duplicates": {"config": {"lookback_hours": 12, "dry_run": dry_run}}}}
        )
    )
    return path


def test_dry_run_reports_but_changes_no_table(scenario: dict) -> None:
    before = snapshot_ids()
    result = run_job(
        "gold_dedup_job",
        scenario["instance"],
        yaml.safe_load(dedup_config(scenario["home"], True).read_text()),
    )
    assert result.success
    metadata = result.output_for_node("find_gold_duplicates")
    assert metadata == []  # nothing handed to stage 2
    found = next(
        e.step_output_data.metadata
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_OUTPUT and e.step_output_data.metadata
    )
    assert found["would_audit"].value == len(ids(scenario["reports"], "replay_new_id")) > 0
    assert snapshot_ids() == before


def test_dedup_killed_between_stages_is_completed_by_the_next_run(scenario: dict) -> None:
    home, replays = scenario["home"], ids(scenario["reports"], "replay_new_id")
    assert replays <= set(table_rows(GOLD_TABLE_SPEC)["message_id"].to_pylist())
    crashed = k2(
        "job", "gold_dedup_job", "-c", str(dedup_config(home, False)),
        home=home, check=False, env={"K2_CRASH_AT": "gold.between_dedup_stages"},
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    audit = table_rows(DEDUP_AUDIT_TABLE_SPEC)
    assert set(audit["message_id"].to_pylist()) == replays  # stage 1 committed its plan...
    assert replays <= set(table_rows(GOLD_TABLE_SPEC)["message_id"].to_pylist())  # ...stage 2 never ran

    assert run_job(
        "gold_dedup_job", scenario["instance"], yaml.safe_load(dedup_config(home, False).read_text())
    ).success
    gold = table_rows(GOLD_TABLE_SPEC)
    assert not replays & set(gold["message_id"].to_pylist())
    audit = table_rows(DEDUP_AUDIT_TABLE_SPEC)
    assert audit.num_rows == len(replays)  # each removal audited once, not again by the second run
    assert set(audit["reason"].to_pylist()) == {"DUPLICATE_TRADE_KEY"}
    by_id = {r["message_id"]: r for r in gold.to_pylist()}
    for row in audit.to_pylist():
        kept = by_id[row["kept_message_id"]]  # the copy that stays is the same trade
        assert (kept["exchange"], kept["symbol"], kept["trade_id"]) == (
            row["exchange"],
            row["symbol"],
            row["trade_id"],
        )
    keys = list(
        zip(
            gold["exchange"].to_pylist(),
            gold["symbol"].to_pylist(),
            gold["trade_id"].to_pylist(),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys))  # no trade twice under any message_id


def test_rematerialising_after_dedup_keeps_the_removals(scenario: dict) -> None:
    deduped = comparable(table_rows(GOLD_TABLE_SPEC), ["message_id"])
    result = materialize(
        scenario["instance"],
        ["gold_crypto_trades"],
        hours_back(9, scenario["now"]),
        this_hour(scenario["now"]),
    )
    assert result.success
    assert comparable(table_rows(GOLD_TABLE_SPEC), ["message_id"]).equals(deduped)
    assert check_results(result)[("gold_crypto_trades", "rows_equal_distinct_silver_trades")].passed
