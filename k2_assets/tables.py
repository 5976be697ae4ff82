"""Every table K2 declares, gathered from the layers that own them."""

from __future__ import annotations

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.gold.tables import DEDUP_AUDIT_TABLE_SPEC, GOLD_TABLE_SPEC
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.exchanges import EXCHANGES
from k2_resources.iceberg import IcebergCatalogResource, TableSpec


def all_table_specs() -> list[TableSpec]:
    specs = [bronze_table_spec(e) for e in EXCHANGES]
    specs += [silver_table_spec(e) for e in EXCHANGES]
    return [*specs, DLQ_TABLE_SPEC, GOLD_TABLE_SPEC, DEDUP_AUDIT_TABLE_SPEC]


def ensure_all_tables(catalog: IcebergCatalogResource) -> list[str]:
    """Create or evolve every declared table; safe to run any number of times."""
    return [catalog.ensure_table(spec).name()[-1] for spec in all_table_specs()]
