"""Operations: the alert sensors and the webhook they send to."""

from __future__ import annotations

import dagster as dg

from k2_assets.operations.alerts import alert_sensors
from k2_resources.alerting import webhook_from_env

defs = dg.Definitions(sensors=alert_sensors, resources={"alert_webhook": webhook_from_env()})
