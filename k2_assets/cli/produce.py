"""`k2 produce`: simulated exchange trades onto an exchange's topic, with a JSON report on stdout."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

from k2_resources.exchanges import EXCHANGES

EPILOG = """\
fault kinds (rate = probability per record; `all=R` sets every kind):
  unreadable: empty_value bad_magic unknown_schema_id truncated_body trailing_garbage
  bad fields: nonpositive_price nonpositive_quantity decimal_overflow side_unknown empty_symbol
              future_timestamp exchange_mismatch late_trade
  repeats:    redelivery replay_new_id      evolved schema: v3_schema
examples:
  k2 produce --exchange binance --count 10000 --faults all=0.01 --seed 7
  k2 produce --exchange kraken --count 600 --rate 10 --start now --realtime
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `produce` to the `k2` command."""
    parser = subparsers.add_parser(
        "produce",
        help="produce simulated exchange trades (and faults) to Kafka",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--exchange", required=True, choices=[e.name for e in EXCHANGES])
    parser.add_argument(
        "--count", required=True, type=non_negative_int, help="Kafka records, faults included"
    )
    parser.add_argument("--rate", type=positive_float, default=None, help="trades per second of market time")
    parser.add_argument(
        "--start", type=start_time, default=None, help="ISO-8601 (UTC unless offset), now, or -3h"
    )
    parser.add_argument(
        "--faults", type=fault_spec, default=None, help="e.g. empty_value=0.01,bad_magic=0.02"
    )
    parser.add_argument("--seed", type=int, default=None, help="same seed and start: same records")
    parser.add_argument("--realtime", action="store_true", help="pace records to the wall clock")
    parser.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    parser.set_defaults(func=run_produce)
    # argparse reads `--start -3h` as an unknown option; let relative times pass as values, as
    # negative numbers do (the parser has no options that look like them).
    parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-(\d+(\.\d+)?[smhdw])+$")


def run_produce(args: argparse.Namespace) -> int:
    """Produce, print the report; a delivery or configuration error exits 1 with the error named."""
    from confluent_kafka import KafkaException
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from k2_resources.dev.simulator.producer import DEFAULT_RATE, produce

    try:
        report = produce(
            args.exchange,
            args.count,
            rate=args.rate or DEFAULT_RATE,
            start=args.start,
            faults=args.faults,
            seed=args.seed,
            realtime=args.realtime,
        )
    except (RuntimeError, ValueError, KafkaException, SchemaRegistryError, OSError) as err:
        print(f"k2 produce: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text + "\n")
    print(text)
    return 0


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def start_time(text: str) -> datetime:
    """Parsed at argument time so a typo is a usage error, not a half-started run."""
    from k2_resources.dev.simulator.producer import parse_time

    try:
        return parse_time(text, datetime.now(UTC))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def fault_spec(text: str) -> str:
    from k2_resources.dev.simulator.faults import parse_faults

    try:
        parse_faults(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text
