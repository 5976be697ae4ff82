"""The one Definitions of the K2 code location: every layer's definitions plus the shared resources."""

from __future__ import annotations

import dagster as dg

from k2_resources.settings import load_devstack_env

load_devstack_env()

from k2_assets.bronze.definitions import defs as bronze_defs  # noqa: E402
from k2_assets.resources import build_resources  # noqa: E402

defs = dg.Definitions.merge(bronze_defs, dg.Definitions(resources=build_resources()))
