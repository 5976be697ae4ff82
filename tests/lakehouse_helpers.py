"""A lakehouse without Kafka for tests of what happens after Bronze: a real Schema Registry (the dev
stack's, served from this process), a real SQLite Iceberg catalog under K2_HOME, and Bronze rows
written as ingestion writes them (Confluent-framed Avro bytes, ingestion time = the hour they land in)."""

from __future__ import annotations

import io
import itertools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.partitions import floor_hour
from k2_resources.dev.devstack.registry import SchemaStore, start_registry_server
from k2_resources.exchanges import EXCHANGES, ExchangeConfig
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.trade_schema import trade_v2_schema, trade_v2_schema_str


@dataclass
class Lakehouse:
    """Where the pipeline's inputs come from: the registry's V2 id and a Bronze writer per exchange."""

    iceberg: IcebergCatalogResource
    v2_ids: dict[str, int]
    offsets: itertools.count = field(default_factory=lambda: itertools.count(0))

    def trade(self, ex: ExchangeConfig, traded: datetime) -> dict:
        """A valid V2 trade of `ex` at `traded`, with a fresh message_id."""
        return {
            "message_id": str(uuid.uuid4()),
            "trade_id": f"{ex.code}-{next(self.offsets)}",
            "symbol": "BTCUSDT" if ex.name == "binance" else "BTCUSD",
            "exchange": ex.code,
            "asset_class": "crypto",
            "timestamp": traded,
            "price": Decimal("67000.12345678"),
            "quantity": Decimal("0.00100000"),
            "currency": "USDT" if ex.name == "binance" else "USD",
            "side": "BUY",
            "trade_conditions": [],
            "source_sequence": None,
            "ingestion_timestamp": traded,
            "platform_sequence": 1,
            "vendor_data": None,
        }

    def framed(self, ex: ExchangeConfig, record: dict) -> bytes:
        out = io.BytesIO(b"\x00" + self.v2_ids[ex.name].to_bytes(4, "big"))
        out.seek(5)
        fastavro.schemaless_writer(out, fastavro.parse_schema(trade_v2_schema()), record)
        return out.getvalue()

    def ingest(self, ex: ExchangeConfig, values: list[tuple[bytes, datetime]], ingested: datetime) -> None:
        """Bronze rows of `ex` read at `ingested`: (raw value, Kafka timestamp) each, new offsets."""
        spec = bronze_table_spec(ex)
        n = len(values)
        rows = pa.table(
            {
                "raw_bytes": pa.array([v for v, _ in values], pa.binary()),
                "message_key": pa.array([b"BTC"] * n, pa.binary()),
                "topic": [ex.topic] * n,
                "partition": pa.array([0] * n, pa.int32()),
                "offset": pa.array([next(self.offsets) for _ in range(n)], pa.int64()),
                "kafka_timestamp": pa.array([t for _, t in values], pa.timestamp("us", tz="UTC")),
                "ingestion_timestamp": pa.array([ingested] * n, pa.timestamp("us", tz="UTC")),
                "ingestion_date": pa.array([ingested.date()] * n, pa.date32()),
            },
            schema=spec.arrow_schema,
        )
        self.iceberg.ensure_table(spec).append(rows)

    def ingest_trades(self, ex: ExchangeConfig, traded: list[datetime], ingested: datetime) -> list[str]:
        """Valid trades at the `traded` times, ingested at `ingested`; their message_ids."""
        records = [self.trade(ex, t) for t in traded]
        self.ingest(ex, [(self.framed(ex, r), r["timestamp"]) for r in records], ingested)
        return [r["message_id"] for r in records]


@contextmanager
def lakehouse(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lakehouse]:
    """K2_HOME at `home` (the SQLite catalog), a registry holding V2 for every exchange's subject."""
    server = start_registry_server(SchemaStore())
    try:
        monkeypatch.setenv("K2_HOME", str(home))
        monkeypatch.setenv("K2_SCHEMA_REGISTRY_URL", server.url)
        monkeypatch.setenv("K2_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # nothing here reads Kafka
        with SchemaRegistryClient({"url": server.url}) as client:
            ids = {
                e.name: client.register_schema(e.subject, Schema(trade_v2_schema_str(), "AVRO"))
                for e in EXCHANGES
            }
        yield Lakehouse(IcebergCatalogResource(), ids)
    finally:
        server.shutdown()


def hour_of(moment: datetime) -> datetime:
    return floor_hour(moment.astimezone(UTC))


def hours(start: datetime, count: int) -> list[datetime]:
    return [start + timedelta(hours=i) for i in range(count)]
