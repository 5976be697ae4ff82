"""Differential test (issue 12 item 5): the stored simulator corpus, run through this tree's pipeline,
gives exactly the Silver, DLQ, Gold and dedup-audit rows of the reference, which was generated from
commit 67b21ad (before the columnar Silver decoder, the DuckDB Gold dedup and the Spark engine).

The corpus and the reference live in tests/data/differential/ (see its README.md); the run is a child
process of this tree (tests/differential_corpus.py: `run_corpus`)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.differential_corpus import (
    OUTPUT_TABLES,
    REFERENCE_DIR,
    Corpus,
    build_corpus,
    coverage_gaps,
    differences,
    misrouted,
    read_outputs,
    run_corpus,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.read(REFERENCE_DIR)


@pytest.fixture(scope="module")
def reference() -> dict[str, pa.Table]:
    return read_outputs(REFERENCE_DIR)


@pytest.fixture(scope="module")
def outputs() -> dict[str, pa.Table]:
    """The corpus through this tree's Dagster definitions, as `k2 run` runs them."""
    return run_corpus()


def test_the_corpus_holds_every_fault_kind_and_every_dlq_category(corpus: Corpus, reference: dict) -> None:
    assert coverage_gaps(corpus, reference) == []
    assert corpus.bronze.num_rows == sum(t.num_rows for n, t in reference.items() if n.startswith("silver_"))


def test_this_tree_gives_the_reference_rows_table_by_table(reference: dict, outputs: dict) -> None:
    found = differences(reference, outputs)
    assert not found, "this tree's outputs differ from the 67b21ad reference:\n" + "\n".join(found)


def test_every_record_lands_where_its_fault_kind_says(corpus: Corpus, outputs: dict) -> None:
    """Not only equal to the reference: each fault kind in its FAULT_CATEGORIES category, valid kinds in
    Silver, so a reference that was wrong from the start could not pass either."""
    assert misrouted(corpus, outputs) == []


def test_a_changed_value_and_a_lost_row_are_named(reference: dict) -> None:
    """The comparison names the table, row key and column of a change, and the key of a lost row."""
    dlq = reference["silver_dlq_trades"]
    categories = dlq["error_category"].to_pylist()
    categories[3] = "VALIDATION_SIDE" if categories[3] != "VALIDATION_SIDE" else "VALIDATION_PRICE"
    field = dlq.schema.get_field_index("error_category")
    changed = dlq.set_column(
        field, dlq.schema.field(field), pa.array(categories, dlq.schema.field(field).type)
    )
    message = differences(reference, {**reference, "silver_dlq_trades": changed})
    row = dlq.slice(3, 1).to_pylist()[0]
    assert len(message) == 1 and message[0].startswith(
        "silver_dlq_trades: rows differ in columns {'error_category': 1}"
    )
    assert (
        f"row 3 {{'exchange': {row['exchange']!r}, 'partition': {row['partition']}, 'offset': {row['offset']}}}"
        in message[0]
    )
    gold = reference["gold_crypto_trades"]
    lost = differences(reference, {**reference, "gold_crypto_trades": gold.slice(1)})
    assert lost[0].startswith(
        f"gold_crypto_trades: {gold.num_rows - 1} rows, expected {gold.num_rows}; by key"
    )
    assert repr(gold["message_id"][0].as_py()) in lost[0]
    assert differences(reference, reference) == []
    assert set(reference) == set(OUTPUT_TABLES)


def test_the_simulator_still_builds_the_stored_corpus(corpus: Corpus) -> None:
    """The stored Bronze rows are the input whatever the simulator becomes; this says when they are no
    longer what `--write-reference` would build (the simulator or the corpus settings changed)."""
    rebuilt = build_corpus()
    assert rebuilt.schemas == corpus.schemas
    assert rebuilt.bronze.equals(corpus.bronze), "the simulator no longer builds the stored corpus"
