"""The one Definitions of the K2 code location: every layer's definitions plus the shared resources."""

from __future__ import annotations

import dagster as dg

from k2_resources.settings import load_devstack_env

load_devstack_env()

from k2_assets.bronze.checks import bronze_freshness_checks  # noqa: E402
from k2_assets.bronze.definitions import defs as bronze_defs  # noqa: E402
from k2_assets.gold.definitions import defs as gold_defs  # noqa: E402
from k2_assets.gold.definitions import freshness_checks as gold_freshness  # noqa: E402
from k2_assets.resources import automation_status, build_resources  # noqa: E402
from k2_assets.silver.definitions import defs as silver_defs  # noqa: E402
from k2_assets.silver.definitions import freshness_checks as silver_freshness  # noqa: E402

freshness_sensor = dg.build_sensor_for_freshness_checks(
    freshness_checks=[*bronze_freshness_checks, *silver_freshness, *gold_freshness],
    name="freshness_checks_sensor",
    minimum_interval_seconds=60,
    default_status=automation_status(),
)

automation_sensor = dg.AutomationConditionSensorDefinition(
    "k2_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=automation_status(),
    minimum_interval_seconds=30,
    description="Refreshes Silver and Gold of the running hour and completes each hour after it closes.",
)

defs = dg.Definitions.merge(
    bronze_defs,
    silver_defs,
    gold_defs,
    dg.Definitions(sensors=[freshness_sensor, automation_sensor], resources=build_resources()),
)
