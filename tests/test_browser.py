"""What an operator sees: the Dagster UI in a real headless Chromium, over a materialised Silver + Gold hour.

A fresh dev stack gets simulated trades (with a few faults, so the DLQ has rows), Bronze is drained,
Silver (both exchanges) and one Gold hour are materialised into a DAGSTER_HOME from
`prepare_dagster_home`, and a real `dagster-webserver` serves it. Playwright drives Debian's Chromium
(never a downloaded browser) through the asset graph, a Gold partition and the checks pages, asserts the
asset and check names are on screen, and saves screenshots under test-output/browser/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from k2_assets.cli.instance import REPO_ROOT
from k2_resources.exchanges import EXCHANGES
from tests.conftest import k2
from tests.test_ci_launch import dagster_services, hour_key, instance_environment

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "test-output" / "browser"
PAGE_TIMEOUT_MS = 60_000
# A few unreadable and invalid records: the DLQ has rows, and its rate stays under the warning limit.
FAULTS = "bad_magic=0.003,nonpositive_price=0.003"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's browser (apt-get install -y chromium)",
)


def materialise(home: Path, silver_hours: list[str], gold_hour: str) -> None:
    """Silver of both exchanges over the ingestion hours, then one Gold event hour, into the instance."""
    import dagster as dg

    from k2_assets.definitions import defs
    from k2_assets.gold.assets import GOLD_KEY
    from k2_assets.silver.assets import dlq_asset_key, silver_asset_key

    job = defs.resolve_implicit_global_asset_job_def()
    silver = [k for e in EXCHANGES for k in (silver_asset_key(e), dlq_asset_key(e))]
    with dg.DagsterInstance.get() as instance:
        range_tags = {
            "dagster/asset_partition_range_start": silver_hours[0],
            "dagster/asset_partition_range_end": silver_hours[-1],
        }
        result = job.execute_in_process(instance=instance, asset_selection=silver, tags=range_tags)
        assert result.success
        result = job.execute_in_process(
            instance=instance, asset_selection=[GOLD_KEY], partition_key=gold_hour
        )
        assert result.success


@pytest.fixture()
def served(fresh_devstack: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A webserver over an instance holding Silver and a Gold hour: (port, Gold partition key)."""
    home = fresh_devstack
    with instance_environment(home) as env:
        ends = []
        for seed, exchange in enumerate(EXCHANGES):
            produced = k2(
                *("produce", "--exchange", exchange.name, "--count", "400", "--rate", "2"),
                *("--faults", FAULTS, "--seed", str(seed + 7)),
                home=home,
            )
            ends.append(datetime.fromisoformat(json.loads(produced.stdout)["end"]))
        before = hour_key(datetime.now(UTC))
        for exchange in EXCHANGES:
            k2("ingest", "--exchange", exchange.name, "--drain", home=home, timeout=300)
        silver_hours = sorted({before, hour_key(datetime.now(UTC))})
        gold_hour = hour_key(max(ends))
        materialise(home, silver_hours, gold_hour)
        with dagster_services(env, tmp_path / "logs", daemon=False) as services:
            yield services.port, gold_hour


def expect_text(page, texts: list[str]) -> None:
    """Each text is rendered visibly somewhere on the page (Playwright waits up to the page timeout)."""
    for text in texts:
        expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_asset_graph_partition_and_checks_are_shown(served: tuple[int, str]) -> None:
    port, gold_hour = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1200})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            shots = visit_pages(page, f"http://127.0.0.1:{port}", gold_hour)
        finally:
            browser.close()
    assert all(path.stat().st_size > 10_000 for path in shots), shots


def visit_pages(page, base: str, gold_hour: str) -> list[Path]:
    """Every page an operator checks after a run; on a failed expectation, what the page showed."""
    gold_checks = ["no_duplicate_message_id", "rows_equal_distinct_silver_trades"]
    silver_checks = ["bronze_rows_equal_silver_plus_dlq", "dlq_rate_within_limits"]
    try:
        return [
            asset_graph(page, base),
            catalog(page, base),
            gold_partition(page, base, gold_hour),
            checks(page, base, "gold_crypto_trades", gold_checks),
            checks(page, base, "silver_binance_trades", silver_checks),
        ]
    except BaseException:
        screenshot(page, "failure")
        raise


def asset_graph(page, base: str) -> Path:
    """The global lineage, every group expanded: Kafka topics -> Bronze -> Silver (+ DLQ) -> Gold."""
    page.goto(f"{base}/asset-groups")
    page.get_by_role("button", name="asset_group gold gold").wait_for()
    page.get_by_role("button", name="settings").last.click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    expect_text(page, ["gold_dedup_audit"])  # the groups are open (short names are never elided)
    page.get_by_role("button", name="zoom_in").click()  # one step in: node names are no longer elided
    names = [
        "market_crypto_trades_binance",
        "market_crypto_trades_kraken",
        *(f"bronze_{e.name}_trades" for e in EXCHANGES),
        *(f"silver_{e.name}_trades" for e in EXCHANGES),
        "gold_crypto_trades",
        "gold_dedup_audit",
    ]
    expect_text(page, names)
    return screenshot(page, "asset-graph")


def catalog(page, base: str) -> Path:
    """The catalog lists full keys, among them the DLQ slices `silver_dlq_trades / <exchange>`."""
    page.goto(f"{base}/assets")
    expect_text(page, ["gold_crypto_trades", "silver_binance_trades"])
    for exchange in EXCHANGES:
        expect(page.get_by_text(f"silver_dlq_trades / {exchange.name}").first).to_be_visible()
    return screenshot(page, "catalog")


def gold_partition(page, base: str, gold_hour: str) -> Path:
    """The Gold hour's page: materialised, into the Gold Iceberg table."""
    page.goto(f"{base}/assets/gold_crypto_trades?view=partitions&partition={gold_hour}")
    expect_text(page, [gold_hour, "Materialized", "market_data.gold_crypto_trades"])
    return screenshot(page, "gold-partition")


def checks(page, base: str, asset: str, names: list[str]) -> Path:
    """The asset's checks page: each named check listed with its latest result, Succeeded.

    Only K2's own data checks are asserted: the freshness check's result depends on the wall clock
    (whether the previous hour, which this test does not build, is past its deadline).
    """
    page.goto(f"{base}/assets/{asset}?view=checks")
    for name in names:
        entry = page.locator("span").filter(has=page.locator(f'[title="{name}"]'))
        expect(entry).to_have_count(1)
        expect(entry).to_contain_text("Succeeded")
    return screenshot(page, f"{asset}-checks")
