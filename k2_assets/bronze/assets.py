"""Kafka topics and Bronze tables as Dagster assets: lineage reads topic -> Bronze -> Silver.

Topics are external assets (nothing in Dagster materialises them). Bronze tables are materialised by
the long-running ingestion jobs in `jobs.py`, which report an AssetMaterialization per Iceberg commit,
so Bronze appears as an asset fed by a job rather than as a partition-by-partition computation.
"""

from __future__ import annotations

import dagster as dg

from k2_assets.bronze.tables import bronze_table_spec
from k2_resources.exchanges import EXCHANGES, ExchangeConfig


def kafka_topic_key(exchange: ExchangeConfig) -> dg.AssetKey:
    return dg.AssetKey(["kafka", exchange.topic.replace(".", "_")])


def bronze_asset_key(exchange: ExchangeConfig) -> dg.AssetKey:
    return dg.AssetKey(bronze_table_spec(exchange).name)


def kafka_topic_spec(exchange: ExchangeConfig) -> dg.AssetSpec:
    return dg.AssetSpec(
        kafka_topic_key(exchange),
        description=f"Kafka topic {exchange.topic}: V2 trades in the Confluent Avro wire format.",
        group_name="kafka",
        kinds={"kafka"},
        metadata={"topic": exchange.topic, "schema_subject": exchange.subject},
    )


def bronze_asset_spec(exchange: ExchangeConfig) -> dg.AssetSpec:
    spec = bronze_table_spec(exchange)
    return dg.AssetSpec(
        bronze_asset_key(exchange),
        deps=[kafka_topic_key(exchange)],
        description=spec.description,
        group_name="bronze",
        kinds={"iceberg"},
        metadata={
            "table": spec.identifier,
            "retention_days": exchange.retention_days,
            "commit_interval_seconds": exchange.commit_interval_seconds,
        },
    )


kafka_topics = [kafka_topic_spec(e) for e in EXCHANGES]
bronze_tables = [bronze_asset_spec(e) for e in EXCHANGES]
