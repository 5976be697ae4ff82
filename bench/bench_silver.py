"""Benchmark: Bronze -> Silver through the real pipeline, against plain fastavro one record at a time.

On a dev stack of its own (real Schema Registry process, SQLite catalog in a temporary K2_HOME) it
lands N framed V2 records (about 1 % corrupt) in `bronze_binance_trades` for the current hour, then
materialises that Silver partition through Dagster in this process: read Bronze from Iceberg, decode
by schema id, validate, write Silver and the DLQ, check conservation. In the same run it decodes the
same payloads one at a time with fastavro.schemaless_reader and nothing else. Prints records/s of
both and the peak RSS of the process.

    .venv/bin/python bench/bench_silver.py [--records 1000000]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import resource
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import thread_cpu_seconds  # noqa: E402


def decode_bench_module():
    """The record generator and the plain-fastavro baseline of bench_silver_decode.py."""
    spec = importlib.util.spec_from_file_location(
        "bench_silver_decode", ROOT / "bench" / "bench_silver_decode.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds() -> float:
    """User + system CPU of this process (every thread: Arrow and arrow-avro work off the main one)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


NATIVE_THREADS = "native threads (PyArrow's pool)"


class ThreadCpu:
    """CPU seconds per thread of this process over the run, from /proc/self/task/*/stat (user + sys).

    getrusage gives the process total only; the pipeline's stages run in threads of their own (Bronze
    read, transform, the main thread's Silver write) and PyArrow's pool does Parquet work in more. A
    thread's last reading is kept after it exits, so threads that end during the run count too (up to
    one sampling interval of each is lost).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.seen, self.names = interval, {}, {}
        self.stop = threading.Event()
        self.sampler = threading.Thread(target=self._run, name="k2-bench-cpu-sampler", daemon=True)

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid, (_, seconds) in thread_cpu_seconds().items():
            self.seen[tid] = seconds
            if tid in names or tid not in self.names:  # a Python thread can show up here before it is named
                self.names[tid] = names.get(tid, NATIVE_THREADS)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._sample()
        self.before = dict(self.seen)
        self.sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.sampler.join()
        self._sample()

    def by_name(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for tid, seconds in self.seen.items():
            name = self.names[tid]
            totals[name] = totals.get(name, 0.0) + seconds - self.before.get(tid, 0.0)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--profile", help="write a cProfile of the materialisation to this file")
    parser.add_argument(
        "--transform-workers",
        type=int,
        help="Bronze batches the Silver step transforms at once (default: the code's TRANSFORM_WORKERS)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="k2-bench-silver-") as tmp:
        os.environ["K2_HOME"] = tmp
        from k2_resources.dev.devstack import start_devstack, stop_devstack

        info = start_devstack(Path(tmp))
        os.environ.update(info.env())
        try:
            if args.transform_workers is not None:
                import k2_assets.silver.assets as silver_assets

                silver_assets.TRANSFORM_WORKERS = args.transform_workers
            run(args.records, info.schema_ids, args.profile)
        finally:
            stop_devstack(Path(tmp))


def run(records: int, schema_ids: dict, profile: str | None = None) -> None:
    import dagster as dg
    import pyarrow as pa

    from k2_assets.bronze.tables import bronze_table_spec
    from k2_assets.definitions import defs
    from k2_assets.partitions import HOUR_KEY_FORMAT
    from k2_resources.exchanges import exchange
    from k2_resources.iceberg import IcebergCatalogResource

    bench = decode_bench_module()
    now = datetime.now(UTC)
    schema_id = next(iter(schema_ids.values())) if isinstance(schema_ids, dict) else 1
    batches = bench.bronze_batches(records, 100_000, schema_id, now)
    bronze = IcebergCatalogResource().ensure_table(bronze_table_spec(exchange("binance")))
    for batch in batches:
        bronze.append(pa.Table.from_batches([batch]).cast(bronze.schema().as_arrow()))
    print(f"landed {records:,} Bronze rows for {now.strftime(HOUR_KEY_FORMAT)}")

    job = defs.resolve_implicit_global_asset_job_def()
    selection = [dg.AssetKey("silver_binance_trades"), dg.AssetKey(["silver_dlq_trades", "binance"])]
    profiler = cProfile.Profile() if profile else None
    setup_started = time.perf_counter()
    with dg.DagsterInstance.ephemeral() as instance:
        # Timed apart: the first instance of a process imports Dagster's storage (~1 s here), which a
        # deployment's code server and run workers have done long before a Silver run.
        setup_seconds = time.perf_counter() - setup_started
        started, cpu_started = time.perf_counter(), cpu_seconds()
        if profiler:
            profiler.enable()
        with ThreadCpu() as threads:
            result = job.execute_in_process(
                instance=instance, asset_selection=selection, partition_key=now.strftime(HOUR_KEY_FORMAT)
            )
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        pipeline_seconds, pipeline_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    checks = {
        e.event_specific_data.check_name: e.event_specific_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }
    conservation = checks["bronze_rows_equal_silver_plus_dlq"]
    meta = {k: v.value for k, v in conservation.metadata.items()}
    assert result.success and conservation.passed and meta["bronze_rows"] == records, meta

    cpu_started = cpu_seconds()
    baseline_seconds, decoded = bench.plain_fastavro(batches)
    baseline_cpu = cpu_seconds() - cpu_started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_seconds = next(
        e.event_specific_data.duration_ms / 1000
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_SUCCESS and e.step_key == "silver_binance"
    )
    print(
        f"Bronze -> Silver via Dagster: {records / pipeline_seconds:,.0f} records/s ({pipeline_seconds:.2f} s; "
        f"{meta['silver_rows']:,} Silver + {meta['dlq_rows']:,} DLQ rows, conservation passed); "
        f"of it the Silver step {step_seconds:.2f} s ({records / step_seconds:,.0f} records/s); "
        f"the instance set up before it in {setup_seconds:.2f} s, not counted"
    )
    print(
        f"plain fastavro, one at a time, decode only: {records / baseline_seconds:,.0f} records/s "
        f"({baseline_seconds:.1f} s, {decoded:,} decoded)"
    )
    print(
        f"CPU time (getrusage of this process, all threads, user+sys): pipeline {pipeline_cpu:.1f} s = "
        f"{records / pipeline_cpu:,.0f} records per CPU-second; fastavro {baseline_cpu:.1f} s = "
        f"{records / baseline_cpu:,.0f} per CPU-second; ratio {baseline_cpu and (records / pipeline_cpu) / (records / baseline_cpu):.2f}x "
        f"(wall ratio {baseline_seconds / pipeline_seconds:.2f}x)"
    )
    per_thread = ", ".join(
        f"{name} {seconds:.2f}" for name, seconds in threads.by_name().items() if seconds >= 0.005
    )
    print(f"CPU-s per thread of the run (/proc/self/task, user+sys): {per_thread}")
    print(
        f"peak RSS of this process: {peak_mb:,.0f} MB (includes the {records:,} input rows held for the baseline)"
    )


if __name__ == "__main__":
    main()
