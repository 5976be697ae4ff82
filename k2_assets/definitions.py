"""The one Definitions of the K2 code location: every layer's definitions plus the shared resources.

`dg dev`, `dg launch` and `dg check defs` load it through [tool.dg] in pyproject.toml; `dagster` and
workspace.yaml through [tool.dagster]. Settings that shape the definitions themselves are read once at
import, each in one place: K2_PARTITIONS_START (k2_assets/partitions.py: partitions must be the same in
the code server, the daemon and every run) and K2_AUTOMATION (k2_assets/resources.py: the default status
of sensors and schedules). Everything else is read when resources are built or checks evaluated.
"""

from __future__ import annotations

import dagster as dg

# Layer modules, not their `defs`: Dagster refuses a module with several Definitions at its top level.
from k2_assets.bronze import definitions as bronze
from k2_assets.feeds import definitions as feeds
from k2_assets.freshness import build_freshness_sensor
from k2_assets.gold import definitions as gold
from k2_assets.maintenance import definitions as maintenance
from k2_assets.operations import definitions as operations
from k2_assets.resources import automation_status, build_resources
from k2_assets.run_supervision import orphaned_run_sensor
from k2_assets.silver import definitions as silver
from k2_resources.settings import load_devstack_env


def location_resources() -> dict[str, object]:
    """The resources, after the dev stack's addresses ($K2_HOME/devstack.env) joined the environment.

    The resources name their settings as `dg.EnvVar`s, resolved when a run or sensor builds them; an
    environment that already names a real cluster wins over the file.
    """
    load_devstack_env()
    return build_resources()


def location_sensors() -> list[dg.SensorDefinition]:
    """The sensors that span the layers: freshness, declarative automation, orphaned runs."""
    freshness = build_freshness_sensor(
        [*bronze.freshness_rules, *silver.freshness_rules, *gold.freshness_rules],
        name="freshness_checks_sensor",
        # Its deadlines are an hour plus minutes (K2_FRESHNESS_DELAY_MINUTES): 2 min late is soon enough.
        minimum_interval_seconds=120,
        default_status=automation_status(),
    )
    automation = dg.AutomationConditionSensorDefinition(
        "k2_automation_sensor",
        target=dg.AssetSelection.all(),
        default_status=automation_status(),
        # Its conditions act on 4-minute and hourly cron ticks: once a minute sees every tick, at half
        # the daemon's evaluation cost of every 30 s (bench/README.md, "Live cost").
        minimum_interval_seconds=60,
        description="Refreshes Silver and Gold of the running hour and completes each hour after it closes.",
    )
    return [freshness, automation, orphaned_run_sensor]


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
        sensors=location_sensors(),
        resources=location_resources(),
        executor=dg.in_process_executor,
    ),
)
