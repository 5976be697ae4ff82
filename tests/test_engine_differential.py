"""The two engines agree: the differential corpus through K2_ENGINE=embedded and K2_ENGINE=spark.

The corpus (tests/differential_corpus.py: simulator records of both exchanges with every fault kind,
V3-schema records, late trades, redeliveries and replays under new ids, stored Bronze rows) is run by
the real Dagster definitions in two child processes, one per engine, Spark on local[2]: Silver + DLQ
over the ingestion hours, Gold over the event hours, gold_dedup_job, Gold again. Every output table
(Silver of each exchange, the DLQ, Gold, the dedup audit), normalised the same way (run-stamped
columns dropped, sorted by key), must be identical row for row and column for column.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from tests.differential_corpus import REFERENCE_DIR, Corpus, coverage_gaps, differences, misrouted, run_corpus

ENGINES = {
    "embedded": {"K2_ENGINE": "embedded"},
    "spark": {"K2_ENGINE": "spark", "K2_SPARK_MASTER": "local[2]"},
}
RUN_TIMEOUT = 2400.0  # a Spark run pays JVM starts and Iceberg's runtime; CI's machine is shared
pytestmark = [pytest.mark.spark_e2e, pytest.mark.timeout(RUN_TIMEOUT + 300)]


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict[str, pa.Table]]:
    """Both engines' normalised tables for the stored corpus (the two runs side by side)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_corpus, env, timeout_s=RUN_TIMEOUT) for name, env in ENGINES.items()}
        return {name: future.result() for name, future in futures.items()}


def test_spark_gives_the_embedded_engines_tables_row_for_row(outputs: dict[str, dict[str, pa.Table]]) -> None:
    embedded, spark = outputs["embedded"], outputs["spark"]
    assert differences(embedded, spark) == []
    for name, table in spark.items():
        assert table.num_rows > 0, f"{name} is empty: the comparison would prove nothing"


def test_the_spark_run_routes_every_fault_kind_where_it_belongs(
    outputs: dict[str, dict[str, pa.Table]],
) -> None:
    corpus, spark = Corpus.read(REFERENCE_DIR), outputs["spark"]
    assert coverage_gaps(corpus, spark) == []
    assert misrouted(corpus, spark) == []
    bronze = Counter(corpus.bronze["exchange"].to_pylist())
    dlq = Counter(spark["silver_dlq_trades"]["exchange"].to_pylist())
    for exchange, rows in bronze.items():  # conservation, table by table
        assert spark[f"silver_{exchange}_trades"].num_rows + dlq[exchange] == rows
    categories = {
        name: Counter(t["silver_dlq_trades"]["error_category"].to_pylist()) for name, t in outputs.items()
    }
    assert categories["spark"] == categories["embedded"] and len(categories["spark"]) >= 5, categories
    reasons = {name: Counter(t["gold_dedup_audit"]["reason"].to_pylist()) for name, t in outputs.items()}
    assert reasons["spark"] == reasons["embedded"] and reasons["spark"]["DUPLICATE_TRADE_KEY"] > 0, reasons
