"""The V2 trade record: the contract on every market.crypto.trades.<exchange> topic."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import fastavro

V2_SCHEMA_FILE = "trade_v2.avsc"


@cache
def trade_v2_schema_str() -> str:
    """The V2 schema as registered in the Schema Registry (the .avsc text)."""
    return resources.files("k2_resources.schemas").joinpath(V2_SCHEMA_FILE).read_text()


@cache
def trade_v2_schema() -> dict[str, Any]:
    return json.loads(trade_v2_schema_str())


@cache
def trade_v2_parsed() -> Any:
    """fastavro's parsed V2 schema: the reader schema for every writer schema on the topics."""
    return fastavro.parse_schema(trade_v2_schema())
