"""Hourly UTC partitions shared by Silver (ingestion hour) and Gold (event hour).

`end_offset=1` makes the running hour a partition, so it can be refreshed during the hour and
completed after it closes.
"""

from __future__ import annotations

import dagster as dg

PARTITIONS_START = "2025-01-01-00:00"

hourly_partitions = dg.HourlyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1, timezone="UTC")

HOUR_KEY_FORMAT = "%Y-%m-%d-%H:00"
