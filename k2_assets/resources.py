"""The resources every K2 code location binds, configured from the environment only.

The embedded dev stack writes K2_KAFKA_BOOTSTRAP_SERVERS and K2_SCHEMA_REGISTRY_URL to
$K2_HOME/devstack.env, which the code location loads; a production deployment sets them (and the
PyIceberg catalog properties) in the environment instead.
"""

# No `from __future__ import annotations`: Dagster resolves resource field annotations at class creation.

import dagster as dg

from k2_resources.engine import EngineIOManager, EngineResource
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import DEFAULT_CHUNK_ROWS
from k2_resources.kafka import kafka_from_env, schema_registry_from_env
from k2_resources.settings import AUTOMATION


def automation_status() -> dg.DefaultSensorStatus:
    """Sensors and schedules run by default; K2_AUTOMATION=off keeps them stopped (tests, CI launches)."""
    return dg.DefaultSensorStatus.RUNNING if AUTOMATION.value() == "on" else dg.DefaultSensorStatus.STOPPED


def schedule_status() -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus(automation_status().value)


class IcebergTablesIOManager(dg.ConfigurableIOManagerFactory):
    """Stores Silver and Gold assets in their declared Iceberg tables, one partition per commit."""

    iceberg: dg.ResourceDependency[IcebergCatalogResource]
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def create_io_manager(self, context: dg.InitResourceContext) -> EngineIOManager:
        from k2_assets.tables import all_table_specs

        return EngineIOManager(self.iceberg, {spec.name: spec for spec in all_table_specs()}, self.chunk_rows)


def build_resources() -> dict[str, object]:
    iceberg = IcebergCatalogResource()
    return {
        "kafka": kafka_from_env(),
        "schema_registry": schema_registry_from_env(),
        "iceberg": iceberg,
        "iceberg_io_manager": IcebergTablesIOManager(iceberg=iceberg),
        # K2_ENGINE=embedded|spark: which engine computes Silver and Gold (k2_resources/engine.py).
        "engine": EngineResource.for_catalog(iceberg),
    }
