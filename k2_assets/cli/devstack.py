"""`k2 devstack up|down|status`: the embedded Kafka + Schema Registry for development and tests."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from k2_resources.dev.devstack.stack import (
    DevstackError,
    DevstackInfo,
    DevstackStatus,
    devstack_status,
    env_path,
    log_path,
    start_devstack,
    stop_devstack,
)


def register(subparsers: Any) -> None:
    """Add the `devstack` command and its `up`, `down`, `status` sub-commands to the `k2` parser."""
    parser = subparsers.add_parser(
        "devstack",
        help="the embedded dev stack (Apache Kafka broker + Schema Registry)",
        description="Run an Apache Kafka broker (KRaft, one node) and a Confluent-compatible Schema Registry "
        "on 127.0.0.1 in the background, and write their addresses to $K2_HOME/devstack.env.",
    )
    actions = parser.add_subparsers(dest="devstack_command", required=True)
    up = actions.add_parser(
        "up", help="start what is not running, create topics, register V2, write devstack.env"
    )
    up.add_argument("--registry-port", type=int, default=0, help="registry port (default 0: any free port)")
    up.add_argument(
        "--kafka-port", type=int, default=0, help="broker port (default: the one it had, else any free port)"
    )
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the stack to answer")
    up.set_defaults(func=_up)
    install = actions.add_parser("install", help="fetch the Kafka broker's jars from Maven Central (once)")
    install.set_defaults(func=_install)
    down = actions.add_parser("down", help="stop the stack and remove devstack.env (Kafka data is kept)")
    down.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait after SIGTERM before SIGKILL"
    )
    down.set_defaults(func=_down)
    status = actions.add_parser("status", help="show whether the stack runs and answers (exit 0 up, 1 down)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each service")
    status.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    try:
        info = start_devstack(
            registry_port=args.registry_port, timeout=args.timeout, kafka_port=args.kafka_port
        )
    except DevstackError as err:
        print(f"k2 devstack up failed: {err}", file=sys.stderr)
        return 1
    if info.already_running:
        print(f"The K2 dev stack is already up (pid {info.pid}); not starting another.")
        if args.registry_port and not info.registry_url.endswith(f":{args.registry_port}"):
            print(f"Note: it listens on {info.registry_url}, not on the requested port {args.registry_port}.")
    else:
        print(f"The K2 dev stack is up (pid {info.pid}, ready in {info.startup_seconds:.1f} s).")
    _print_addresses(info)
    for subject, schema_id in info.schema_ids.items():
        print(f"  registered V2 as {subject} -> schema id {schema_id}")
    return 0


def _install(args: argparse.Namespace) -> int:
    from k2_resources.dev.devstack import kafka

    try:
        folder = kafka.install_jars()
    except kafka.KafkaSetupError as err:
        print(f"k2 devstack install failed: {err}", file=sys.stderr)
        return 1
    print(f"{kafka.describe()}: jars in {folder}")
    return 0


def _print_addresses(info: DevstackInfo) -> None:
    broker = f", pid {info.broker_pid}" if info.broker_pid else ""
    print(f"  Kafka: {info.kafka}{broker}")
    print(f"  Kafka bootstrap servers: {info.bootstrap_servers}")
    print(f"  Schema Registry:         {info.registry_url}")
    print(f"  Settings in {env_path(info.home)}; log in {log_path(info.home)}")


def _down(args: argparse.Namespace) -> int:
    try:
        pid = stop_devstack(timeout=args.timeout)
    except DevstackError as err:
        print(f"k2 devstack down failed: {err}", file=sys.stderr)
        return 1
    if pid is None:
        print("The K2 dev stack was not running.")
    else:
        print(f"The K2 dev stack is down (pid {pid} stopped; Kafka data and schemas are kept).")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = devstack_status(timeout=args.timeout)
    if status.info is None:
        print("The K2 dev stack is down.")
        if status.unpublished_pid is not None:
            print(f"  A host (pid {status.unpublished_pid}) runs but has not published its addresses yet.")
        if status.stale_pid is not None:
            print(f"  (removed a stale pid file for process {status.stale_pid}, which is not running)")
        return 1
    print(
        f"The K2 dev stack is {'up' if status.healthy else 'running but NOT reachable'} (pid {status.info.pid})."
    )
    _print_addresses(status.info)
    _print_kafka(status)
    if status.registry_error is not None:
        print(f"  Schema Registry unreachable: {status.registry_error}")
    else:
        print(
            f"  Schema Registry answers: {len(status.registry_subjects)} subjects {status.registry_subjects}"
        )
    return 0 if status.healthy else 1


def _print_kafka(status: DevstackStatus) -> None:
    if status.kafka_error is not None:
        print(f"  Kafka unreachable: {status.kafka_error}")
        return
    for topic, marks in status.topics.items():
        messages = sum(high - low for low, high in marks.values())
        print(f"  Kafka topic {topic}: {len(marks)} partitions, {messages} messages retained")
