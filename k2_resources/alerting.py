"""Notifications to a chat webhook (Slack-compatible JSON), rate-limited, with recoveries announced once.

K2 runs without Dagster+, so nothing tells anyone that a run failed or a check went red unless K2 says
so itself. The sensors in k2_assets/operations/alerts.py decide which conditions hold; this module
sends them: a firing condition is announced when it starts and then at most once per repeat interval
while it lasts; when it stops, one recovery message. The state of each condition lives in the sensor's
cursor (see `AlertBook`), so a daemon restart neither repeats nor forgets an alert.
"""

# No `from __future__ import annotations`: Dagster resolves resource field annotations at class creation.

import json
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from k2_resources.settings import (
    ALERT_LAG_RECORDS,
    ALERT_REPEAT_MINUTES,
    ALERT_SILENT_MINUTES,
    ALERT_WEBHOOK_URL,
    UI_BASE_URL,
)

WEBHOOK_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class AlertSettings:
    """Every alert threshold, read from the environment in this one place and validated by name."""

    ui_base_url: str
    lag_records: float
    silent_seconds: float
    repeat_seconds: float

    @classmethod
    def from_env(cls) -> "AlertSettings":
        return cls(
            ui_base_url=UI_BASE_URL.value(),
            lag_records=ALERT_LAG_RECORDS.value(),
            silent_seconds=60 * ALERT_SILENT_MINUTES.value(),
            repeat_seconds=60 * ALERT_REPEAT_MINUTES.value(),
        )

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_base_url}/runs/{run_id}"

    def asset_url(self, asset_key: dg.AssetKey) -> str:
        return f"{self.ui_base_url}/assets/{'/'.join(asset_key.path)}"


@dataclass(frozen=True)
class Condition:
    """One thing that may need a person, e.g. `lag:binance`; `firing` says whether it holds now."""

    key: str
    firing: bool
    summary: str
    link: str


def message(condition: Condition, state: str) -> dict:
    """Slack-compatible JSON: `text` for any webhook, `blocks` for Slack's richer rendering."""
    icon = {"firing": ":rotating_light:", "repeat": ":rotating_light:", "resolved": ":white_check_mark:"}[
        state
    ]
    title = {"firing": "K2 ALERT", "repeat": "K2 ALERT (still firing)", "resolved": "K2 RESOLVED"}[state]
    text = f"{icon} {title} [{condition.key}] {condition.summary} <{condition.link}|open in Dagster>"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}* `{condition.key}`"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": condition.summary}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{condition.link}|open in Dagster>"}],
            },
        ],
    }


class AlertWebhookResource(dg.ConfigurableResource):
    """A Slack-compatible incoming webhook. The URL is a secret: bind it with dg.EnvVar, never a file."""

    url: str
    timeout_seconds: float = WEBHOOK_TIMEOUT_SECONDS

    def post(self, payload: dict) -> None:
        """POST one message; raises on a non-2xx answer or no answer, so the sender keeps it for later."""
        body = json.dumps(payload).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
            if not 200 <= response.status < 300:
                raise RuntimeError(f"alert webhook answered HTTP {response.status}")


def webhook_from_env() -> AlertWebhookResource:
    return AlertWebhookResource(url=dg.EnvVar(ALERT_WEBHOOK_URL.name))


class AlertBook:
    """Per condition: firing or not, and when it was last announced. Serialised into a sensor cursor."""

    def __init__(self, cursor: str | None) -> None:
        self.state: dict[str, dict] = json.loads(cursor or "{}").get("alerts", {})

    def to_cursor(self, **extra: object) -> str:
        return json.dumps({"alerts": self.state, **extra}, sort_keys=True)

    def due(self, condition: Condition, now: float, repeat_seconds: float) -> str | None:
        """What to announce about `condition` now: firing, repeat, resolved, or nothing."""
        known = self.state.get(condition.key)
        if condition.firing and known is None:
            return "firing"
        if condition.firing and now - known["sent"] >= repeat_seconds:
            return "repeat"
        if not condition.firing and known is not None:
            return "resolved"
        return None

    def record(self, condition: Condition, now: float) -> None:
        if condition.firing:
            self.state[condition.key] = {"sent": now}
        else:
            self.state.pop(condition.key, None)


def notify(
    webhook: AlertWebhookResource,
    book: AlertBook,
    conditions: Iterable[Condition],
    now: float,
    repeat_seconds: float,
) -> tuple[list[str], list[str]]:
    """Send what is due; (sent, failed) as `state key` strings. A failed send is retried at the next tick."""
    sent, failed = [], []
    for condition in conditions:
        state = book.due(condition, now, repeat_seconds)
        if state is None:
            continue
        try:
            webhook.post(message(condition, state))
        except Exception as err:  # noqa: BLE001 - any failure: keep the alert due, report it, go on
            failed.append(f"{state} {condition.key}: {err}")
            continue
        book.record(condition, now)
        sent.append(f"{state} {condition.key}")
    return sent, failed
