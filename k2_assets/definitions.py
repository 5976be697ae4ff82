"""The one Definitions of the K2 code location: every layer's definitions plus the shared resources."""

from __future__ import annotations

import dagster as dg

from k2_resources.settings import load_devstack_env

load_devstack_env()

# Layer modules, not their `defs`: Dagster refuses a module with several Definitions at its top level.
from k2_assets.bronze import definitions as bronze  # noqa: E402
from k2_assets.feeds import definitions as feeds  # noqa: E402
from k2_assets.freshness import build_freshness_sensor  # noqa: E402
from k2_assets.gold import definitions as gold  # noqa: E402
from k2_assets.maintenance import definitions as maintenance  # noqa: E402
from k2_assets.operations import definitions as operations  # noqa: E402
from k2_assets.resources import automation_status, build_resources  # noqa: E402
from k2_assets.run_supervision import orphaned_run_sensor  # noqa: E402
from k2_assets.silver import definitions as silver  # noqa: E402

freshness_sensor = build_freshness_sensor(
    [*bronze.freshness_checks, *silver.freshness_checks, *gold.freshness_checks],
    name="freshness_checks_sensor",
    minimum_interval_seconds=60,
    default_status=automation_status(),
)

automation_sensor = dg.AutomationConditionSensorDefinition(
    "k2_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=automation_status(),
    # Its conditions act on 5-minute and hourly cron ticks: once a minute sees every tick, at half the
    # daemon's evaluation cost of every 30 s (bench/README.md, "Live cost").
    minimum_interval_seconds=60,
    description="Refreshes Silver and Gold of the running hour and completes each hour after it closes.",
)

defs = dg.Definitions.merge(
    bronze.defs,
    silver.defs,
    gold.defs,
    feeds.defs,
    maintenance.defs,
    operations.defs,
    # In-process: a run is one process. The multiprocess default started another Python process (importing
    # all of K2 again, 3-6 s of CPU) per step: per check of a check run, per asset of an automation run.
    dg.Definitions(
        sensors=[freshness_sensor, automation_sensor, orphaned_run_sensor],
        resources=build_resources(),
        executor=dg.in_process_executor,
    ),
)
