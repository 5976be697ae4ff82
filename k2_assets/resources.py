"""The resources every K2 code location binds, configured from the environment only.

The embedded dev stack writes K2_KAFKA_BOOTSTRAP_SERVERS and K2_SCHEMA_REGISTRY_URL to
$K2_HOME/devstack.env, which the code location loads; a production deployment sets them (and the
PyIceberg catalog properties) in the environment instead.
"""

from __future__ import annotations

import os

import dagster as dg

from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.kafka import KafkaResource, SchemaRegistryResource
from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL

AUTOMATION_SETTING = "K2_AUTOMATION"


def automation_status() -> dg.DefaultSensorStatus:
    """Sensors and schedules run by default; K2_AUTOMATION=off keeps them stopped (tests, CI launches)."""
    value = os.environ.get(AUTOMATION_SETTING, "on").lower()
    if value not in ("on", "off"):
        raise ValueError(f"{AUTOMATION_SETTING} must be 'on' or 'off', not {value!r}")
    return dg.DefaultSensorStatus.RUNNING if value == "on" else dg.DefaultSensorStatus.STOPPED


def schedule_status() -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus(automation_status().value)


def build_resources() -> dict[str, object]:
    return {
        "kafka": KafkaResource(bootstrap_servers=dg.EnvVar(KAFKA_BOOTSTRAP_SERVERS)),
        "schema_registry": SchemaRegistryResource(url=dg.EnvVar(SCHEMA_REGISTRY_URL)),
        "iceberg": IcebergCatalogResource(),
    }
