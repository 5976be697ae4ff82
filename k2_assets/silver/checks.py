"""Checks on every Silver partition: conservation and the DLQ rate, both blocking Gold when they fail.

Conservation is the promise the predecessor broke when rows whose validity was NULL vanished from
both outputs: every Bronze row of the partition's window, in the Bronze snapshot that was read, is
either a Silver row or a DLQ row.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from k2_resources.exchanges import ExchangeConfig

CONSERVATION = "bronze_rows_equal_silver_plus_dlq"
DLQ_RATE = "dlq_rate_within_limits"
BLOCKING_CHECKS = (CONSERVATION, DLQ_RATE)


def silver_check_specs(silver_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            CONSERVATION,
            asset=silver_key,
            blocking=True,
            description="Bronze rows of the partition's window (in the Bronze snapshot read) = Silver rows + DLQ rows.",
        ),
        # Blocking: above the exchange's fail rate the partition is suspect (a misaddressed registry sends
        # everything to the DLQ while conservation holds), and Gold must not replace hours with it.
        dg.AssetCheckSpec(
            DLQ_RATE,
            asset=silver_key,
            blocking=True,
            description="Share of the partition's Bronze rows sent to the DLQ: warns above the exchange's warn "
            "rate; above its fail rate fails the run and holds Gold back.",
        ),
    ]


def conservation_result(
    silver_key: dg.AssetKey, bronze_rows: int, silver_rows: int, dlq_rows: int, bronze_snapshot_id: int | None
) -> dg.AssetCheckResult:
    missing = bronze_rows - silver_rows - dlq_rows
    return dg.AssetCheckResult(
        check_name=CONSERVATION,
        asset_key=silver_key,
        passed=missing == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "bronze_rows": bronze_rows,
            "silver_rows": silver_rows,
            "dlq_rows": dlq_rows,
            "unaccounted_rows": missing,
            "bronze_snapshot_id": str(bronze_snapshot_id),
        },
        description=None if missing == 0 else f"{missing} Bronze rows are neither in Silver nor in the DLQ",
    )


def dlq_rate_result(
    silver_key: dg.AssetKey,
    exchange: ExchangeConfig,
    bronze_rows: int,
    dlq_rows: int,
    categories: Mapping[str, int],
) -> dg.AssetCheckResult:
    rate = dlq_rows / bronze_rows if bronze_rows else 0.0
    severity = dg.AssetCheckSeverity.ERROR if rate > exchange.dlq_fail_rate else dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(
        check_name=DLQ_RATE,
        asset_key=silver_key,
        passed=rate <= exchange.dlq_warn_rate,
        severity=severity,
        metadata={
            "dlq_rate": dg.MetadataValue.float(round(rate, 6)),
            "warn_above": exchange.dlq_warn_rate,
            "fail_above": exchange.dlq_fail_rate,
            **{f"dlq_{category.lower()}": count for category, count in sorted(categories.items())},
        },
    )
