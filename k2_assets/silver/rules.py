"""What makes a Bronze record fit for Silver: the DLQ categories and the validation rules, in order.

The predecessor let rows whose validity evaluated to NULL vanish from both Silver and its DLQ. Here
every check is a plain Python comparison on one decoded record that treats a missing or null value as
a failure of that check, and the first failing check names the record's DLQ category.

Validation order (the first failure wins): message_id, exchange, asset_class, symbol, currency, side,
price > 0, quantity > 0, decimal(18,8) fit of price then quantity, timestamp window. Positivity comes
before the decimal fit, so a record with a negative, overflowing price is reported as VALIDATION_PRICE.

Prices and quantities reach these checks as Avro's unscaled integers plus the writer schema's scale,
never as floats or rounded Decimals, so every comparison and every error message is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import Field

from k2_assets.tunables import Tunables
from k2_resources.exchanges import ExchangeConfig
from k2_resources.trade_schema import v2_decimal


class DlqCategory(StrEnum):
    """Why a Bronze record went to the DLQ; the value is what the DLQ's error_category column holds."""

    EMPTY_VALUE = "EMPTY_VALUE"
    BAD_MAGIC_BYTE = "BAD_MAGIC_BYTE"
    TRUNCATED_HEADER = "TRUNCATED_HEADER"
    UNKNOWN_SCHEMA_ID = "UNKNOWN_SCHEMA_ID"
    AVRO_DECODE_ERROR = "AVRO_DECODE_ERROR"
    VALIDATION_MESSAGE_ID = "VALIDATION_MESSAGE_ID"
    VALIDATION_EXCHANGE = "VALIDATION_EXCHANGE"
    VALIDATION_ASSET_CLASS = "VALIDATION_ASSET_CLASS"
    VALIDATION_SYMBOL = "VALIDATION_SYMBOL"
    VALIDATION_CURRENCY = "VALIDATION_CURRENCY"
    VALIDATION_SIDE = "VALIDATION_SIDE"
    VALIDATION_PRICE = "VALIDATION_PRICE"
    VALIDATION_QUANTITY = "VALIDATION_QUANTITY"
    VALIDATION_DECIMAL_OVERFLOW = "VALIDATION_DECIMAL_OVERFLOW"
    VALIDATION_TIMESTAMP = "VALIDATION_TIMESTAMP"


DLQ_CATEGORIES: tuple[str, ...] = tuple(category.value for category in DlqCategory)
DECODE_CATEGORIES: tuple[str, ...] = DLQ_CATEGORIES[:5]
VALIDATION_CATEGORIES: tuple[str, ...] = DLQ_CATEGORIES[5:]

DECODE_STAGE = "decode"
VALIDATE_STAGE = "validate"

# The V2 fields whose null value a check below rejects with its own category. A writer schema that makes
# one of them nullable is still decoded (the reader is widened for it) so that the null reaches its check;
# a null in any other V2 field cannot resolve to V2 and fails decoding instead.
NULL_CHECKED_FIELDS: frozenset[str] = frozenset(
    {
        "message_id",
        "exchange",
        "asset_class",
        "symbol",
        "currency",
        "side",
        "price",
        "quantity",
        "timestamp",
    }
)

SILVER_PRECISION, SILVER_SCALE = v2_decimal()  # price and quantity as the .avsc declares them: 18, 8
MAX_INTEGER_DIGITS = SILVER_PRECISION - SILVER_SCALE
MAX_UNITS = 10**SILVER_PRECISION  # exclusive bound on |value| * 10**SILVER_SCALE
SIDES = frozenset({"BUY", "SELL"})
ASSET_CLASS = "crypto"
_UUID_BODY = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID = re.compile(_UUID_BODY)  # used with fullmatch
UUID_PATTERN = f"^{_UUID_BODY}$"  # the same test for Arrow's RE2 (`$` is the end of the text there)
_MICROS = timedelta(microseconds=1)
MAX_SHOWN_BITS = 512  # decimals beyond this are described, not printed, in error messages
MAX_SHOWN_CHARS = 80  # string values are cut to this in error messages

Failure = tuple[DlqCategory, str]
_UNCHECKED: Any = object()


class TimestampBounds(Tunables):
    """The time window a valid trade falls in (defaults suit live feeds; widen them for old replays).

    The one declaration of these bounds: `ValidationRules` (what the checks read, as timedeltas) and
    Silver's run config derive from it.
    """

    max_future_skew_seconds: float = Field(
        300.0, ge=0, description="How far a trade may be after its Bronze ingestion (seconds)."
    )
    # The predecessor's rule: a trade is valid up to a year before its ingestion, so a producer replaying
    # last month's trades is not sent to the DLQ (a 7-day bound did that).
    max_age_hours: float = Field(
        365 * 24.0, ge=0, description="How far a trade may be before its Bronze ingestion (hours; one year)."
    )
    max_kafka_skew_seconds: float = Field(
        3600.0, ge=0, description="Allowed gap between trade time and Kafka timestamp (seconds)."
    )

    def rules(self) -> ValidationRules:
        return ValidationRules(
            max_future_skew=timedelta(seconds=self.max_future_skew_seconds),
            max_age=timedelta(hours=self.max_age_hours),
            max_kafka_skew=timedelta(seconds=self.max_kafka_skew_seconds),
        )


@dataclass(frozen=True)
class ValidationRules:
    """`TimestampBounds` as the checks read them; its defaults and bounds are the config's."""

    max_future_skew: timedelta = timedelta(seconds=TimestampBounds.default_of("max_future_skew_seconds"))
    max_age: timedelta = timedelta(hours=TimestampBounds.default_of("max_age_hours"))
    max_kafka_skew: timedelta = timedelta(seconds=TimestampBounds.default_of("max_kafka_skew_seconds"))

    def __post_init__(self) -> None:
        """Rules built directly (tests, benchmarks) are held to the config's bounds, by its field names."""
        TimestampBounds(
            max_future_skew_seconds=self.max_future_skew.total_seconds(),
            max_age_hours=self.max_age / timedelta(hours=1),
            max_kafka_skew_seconds=self.max_kafka_skew.total_seconds(),
        )


def format_decimal(unscaled: int, scale: int) -> str:
    """The exact decimal text of unscaled * 10**-scale, e.g. (-100000000, 8) -> '-1.00000000'.

    A corrupt record can carry a decimal of thousands of digits, which Python refuses to turn into
    text; those are described by their size instead.
    """
    sign = "-" if unscaled < 0 else ""
    if abs(unscaled).bit_length() > MAX_SHOWN_BITS:
        return f"{sign}<{abs(unscaled).bit_length()}-bit unscaled integer at scale {scale}>"
    digits = str(abs(unscaled)).rjust(scale + 1, "0")
    if scale <= 0:
        return f"{sign}{digits}{'0' * -scale}"
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def to_silver_units(unscaled: int, scale: int) -> int | None:
    """unscaled * 10**-scale as an integer count of 1e-8, or None when that needs more than 8 decimals."""
    if scale <= SILVER_SCALE:
        return unscaled * 10 ** (SILVER_SCALE - scale)
    units, remainder = divmod(unscaled, 10 ** (scale - SILVER_SCALE))
    return None if remainder else units


def shown(value: str | None) -> str:
    """A field value for an error message: its repr, cut short so garbage cannot bloat the DLQ."""
    if value is not None and len(value) > MAX_SHOWN_CHARS:
        return f"{value[:MAX_SHOWN_CHARS]!r}… ({len(value)} chars)"
    return repr(value)


def format_micros(micros: int) -> str:
    """An ISO-8601 UTC rendering of epoch microseconds for error messages (raw number if out of range)."""
    try:
        return (datetime(1970, 1, 1, tzinfo=UTC) + micros * _MICROS).isoformat()
    except OverflowError:
        return f"{micros} µs since epoch"


class RecordChecker:
    """Runs the validation checks of one exchange on decoded V2 records, first failure wins.

    The five label checks (exchange, asset_class, symbol, currency, side) depend on nothing but those
    five values, which a batch repeats for thousands of records, so their outcome is memoised per
    distinct combination; `reset_cache` bounds that memo to one batch so garbage cannot grow it.
    """

    def __init__(self, exchange: ExchangeConfig, rules: ValidationRules) -> None:
        self.exchange = exchange
        self.code = exchange.code
        self.max_future_skew_us = rules.max_future_skew // _MICROS
        self.max_age_us = rules.max_age // _MICROS
        self.max_kafka_skew_us = rules.max_kafka_skew // _MICROS
        self._labels: dict[tuple[Any, ...], Failure | None] = {}

    def reset_cache(self) -> None:
        self._labels.clear()

    def first_failure(
        self,
        record: dict[str, Any],
        price_scale: int,
        quantity_scale: int,
        ingestion_us: int | None,
        kafka_us: int | None,
    ) -> Failure | None:
        """The first failing check as (category, message), or None when the record is valid.

        `record` is a decoded V2 record whose price and quantity are unscaled integers at the given
        scales; the two times are the Bronze row's ingestion_timestamp and kafka_timestamp in µs.
        """
        labels = (
            record["exchange"],
            record["asset_class"],
            record["symbol"],
            record["currency"],
            record["side"],
        )
        labels_failure = self._labels.get(labels, _UNCHECKED)
        if labels_failure is _UNCHECKED:
            labels_failure = self._labels[labels] = self.check_labels(*labels)
        price, quantity = record["price"], record["quantity"]
        return (
            self.check_message_id(record["message_id"])
            or labels_failure
            or check_positive(DlqCategory.VALIDATION_PRICE, "price", price, price_scale)
            or check_positive(DlqCategory.VALIDATION_QUANTITY, "quantity", quantity, quantity_scale)
            or check_fits_silver("price", price, price_scale)
            or check_fits_silver("quantity", quantity, quantity_scale)
            or self.check_timestamp(record["timestamp"], ingestion_us, kafka_us)
        )

    def check_labels(
        self,
        exchange: str | None,
        asset_class: str | None,
        symbol: str | None,
        currency: str | None,
        side: str | None,
    ) -> Failure | None:
        """The label checks in validation order (they come right after message_id)."""
        return (
            self.check_exchange(exchange)
            or self.check_asset_class(asset_class)
            or self.check_symbol(symbol)
            or self.check_currency(currency)
            or self.check_side(side)
        )

    def check_message_id(self, value: str | None) -> Failure | None:
        if value is None:
            return DlqCategory.VALIDATION_MESSAGE_ID, "message_id is null"
        if _UUID.fullmatch(value) is None:
            return DlqCategory.VALIDATION_MESSAGE_ID, f"message_id {shown(value)} is not a UUID"
        return None

    def check_exchange(self, value: str | None) -> Failure | None:
        if value != self.code:
            return DlqCategory.VALIDATION_EXCHANGE, f"exchange {shown(value)} is not {self.code!r}"
        return None

    def check_asset_class(self, value: str | None) -> Failure | None:
        if value != ASSET_CLASS:
            return DlqCategory.VALIDATION_ASSET_CLASS, f"asset_class {shown(value)} is not {ASSET_CLASS!r}"
        return None

    def check_symbol(self, value: str | None) -> Failure | None:
        if not value or not value.strip():
            return DlqCategory.VALIDATION_SYMBOL, f"symbol {shown(value)} is empty or null"
        normalised = self.exchange.normalise_symbol(value)[0]
        if value != normalised:
            return (
                DlqCategory.VALIDATION_SYMBOL,
                f"symbol {shown(value)} is not normalised: expected {shown(normalised)}",
            )
        return None

    def check_currency(self, value: str | None) -> Failure | None:
        if not value or not value.strip():
            return DlqCategory.VALIDATION_CURRENCY, f"currency {shown(value)} is empty or null"
        return None

    def check_side(self, value: str | None) -> Failure | None:
        if value not in SIDES:
            return DlqCategory.VALIDATION_SIDE, f"side {shown(value)} is not BUY or SELL"
        return None

    def check_timestamp(
        self, trade_us: int | None, ingestion_us: int | None, kafka_us: int | None
    ) -> Failure | None:
        """The trade time against the Bronze ingestion time (future skew, age) and the Kafka record time."""
        category = DlqCategory.VALIDATION_TIMESTAMP
        if trade_us is None or ingestion_us is None or kafka_us is None:
            return category, (
                f"cannot place the trade in time: timestamp={trade_us}, bronze ingestion_timestamp="
                f"{ingestion_us}, kafka_timestamp={kafka_us} (µs; None is null)"
            )
        if trade_us - ingestion_us > self.max_future_skew_us:
            gap = _gap(trade_us, ingestion_us)
            return (
                category,
                f"timestamp {format_micros(trade_us)} is {gap} after bronze ingestion (max_future_skew)",
            )
        if ingestion_us - trade_us > self.max_age_us:
            gap = _gap(trade_us, ingestion_us)
            return category, f"timestamp {format_micros(trade_us)} is {gap} before bronze ingestion (max_age)"
        if abs(trade_us - kafka_us) > self.max_kafka_skew_us:
            gap = _gap(trade_us, kafka_us)
            return (
                category,
                f"timestamp {format_micros(trade_us)} is {gap} from kafka_timestamp (max_kafka_skew)",
            )
        return None


def _gap(a_us: int, b_us: int) -> str:
    """|a - b| as a timedelta text, or in µs when it does not fit a timedelta."""
    try:
        return str(abs(a_us - b_us) * _MICROS)
    except OverflowError:
        return f"{abs(a_us - b_us)} µs"


def check_positive(category: DlqCategory, name: str, unscaled: int | None, scale: int) -> Failure | None:
    if unscaled is None:
        return category, f"{name} is null"
    if unscaled <= 0:
        return category, f"{name} {format_decimal(unscaled, scale)} <= 0"
    return None


def check_fits_silver(name: str, unscaled: int | None, scale: int) -> Failure | None:
    """Silver stores decimal(18,8): at most 10 integer and 8 fractional digits, never rounded."""
    category = DlqCategory.VALIDATION_DECIMAL_OVERFLOW
    if unscaled is None:
        return category, f"{name} is null"
    units = to_silver_units(unscaled, scale)
    if units is None:
        text = format_decimal(unscaled, scale)
        return category, f"{name} {text} has more than {SILVER_SCALE} fractional digits"
    if abs(units) >= MAX_UNITS:
        text = format_decimal(unscaled, scale)
        return category, f"{name} {text} has more than {MAX_INTEGER_DIGITS} integer digits"
    return None
