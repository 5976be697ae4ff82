"""Feeds: the live exchange WebSocket jobs, their keep-alive sensors and the topic freshness checks."""

from __future__ import annotations

import dagster as dg

from k2_assets.feeds.checks import feed_freshness_checks
from k2_assets.feeds.jobs import feed_jobs
from k2_assets.feeds.sensors import feed_sensors

defs = dg.Definitions(asset_checks=feed_freshness_checks, jobs=list(feed_jobs.values()), sensors=feed_sensors)
