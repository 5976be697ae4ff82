"""K2's run logs as one JSON object per line (K2_LOG_FORMAT=json), for log shippers and `jq`.

Dagster's console logger writes text to stderr. With K2_LOG_FORMAT=json, `K2LogHandler` (configured in
dagster.yaml's `python_logs`, so every run of every process of the instance has it) also writes each
log record to stdout as one JSON object: the run id, job, step, and where it can tell them the asset,
partition and exchange. The value of every
secret setting in the environment is replaced by *** in each line: a client that echoes its config,
or an exception that quotes a URL with a token in it, must not put a secret into log storage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from k2_resources.settings import LOG_FORMAT

# Settings whose values are secrets wherever they appear (client properties by name: k2_resources.settings).
SECRET_SETTING = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|WEBHOOK_URL|SASL_|SSL_KEY")
PARTITION_TAGS = ("dagster/partition", "dagster/asset_partition_range_start")
EXCHANGE_TAG = "k2/ingestion"


def log_format() -> str:
    """K2_LOG_FORMAT: `text` (Dagster's console logger, the default) or `json`."""
    return LOG_FORMAT.value()


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of the secret settings in the environment, longest first (so none is half-replaced)."""
    environ = dict(os.environ) if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_SETTING.search(k) and len(v) >= 4}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _exchange(names: list[str]) -> str | None:
    from k2_resources.exchanges import EXCHANGES

    for name in names:
        for exchange in EXCHANGES:
            if re.search(rf"(^|[_/]){exchange.name}([_/]|$)", name):
                return exchange.name
    return None


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What Dagster knows about the line: its `dagster_meta` (run, job, step, event) as flat fields."""
    meta = getattr(record, "dagster_meta", None) or {}
    event = meta.get("dagster_event")
    tags = meta.get("job_tags") or meta.get("run_tags") or {}
    asset_key = getattr(event, "asset_key", None) if event is not None else None
    asset = asset_key.to_user_string() if asset_key is not None else None
    partition = getattr(event, "partition", None) if event is not None else None
    partition = partition or next((tags[t] for t in PARTITION_TAGS if t in tags), None)
    job, step = meta.get("job_name"), meta.get("step_key")
    exchange = tags.get(EXCHANGE_TAG) or _exchange([n for n in (asset, step, job) if n])
    fields = {
        "run_id": meta.get("run_id"),
        "job": job,
        "step": step,
        "event": event.event_type_value if event is not None else None,
        "asset": asset,
        "partition": partition,
        "exchange": exchange,
    }
    return {k: v for k, v in fields.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets of the environment replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = secret_values()

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        message = meta.get("orig_message") or record.getMessage()
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            **record_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str), self.secrets)


class K2LogHandler(logging.StreamHandler):
    """The handler dagster.yaml's `python_logs` gives every run: JSON lines on stdout, if K2_LOG_FORMAT=json.

    Dagster's own text console stays on stderr (it cannot be replaced from the instance file without
    run config in every run), so a log shipper reading stdout gets only the JSON objects.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.enabled = log_format() == "json"
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if self.enabled:
            super().emit(record)
