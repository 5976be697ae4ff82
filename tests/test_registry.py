"""The dev stack's Schema Registry, driven by confluent-kafka's own client and Avro serdes over HTTP."""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_resources.dev.devstack.registry import incompatibilities, parse_avro
from k2_resources.exchanges import EXCHANGES
from k2_resources.settings import SCHEMA_REGISTRY_URL, read_env_file
from k2_resources.trade_schema import trade_v2_schema, trade_v2_schema_str

OPTIONAL_VENUE = {"name": "venue", "type": ["null", "string"], "default": None}


@pytest.fixture()
def client(devstack_env: dict[str, str]) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": devstack_env[SCHEMA_REGISTRY_URL], "max.retries": 0}) as registry:
        yield registry


def _subject(name: str) -> str:
    """A subject of this test alone: the module's registry is shared by its tests."""
    return f"k2-test-{name}-{uuid.uuid4().hex[:8]}-value"


def _v2_changed(change: Callable[[dict[str, Any]], None]) -> str:
    schema = copy.deepcopy(trade_v2_schema())
    change(schema)
    return json.dumps(schema)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in schema["fields"] if item["name"] == name)


def _v3() -> str:
    """V2 plus one optional field with default null: the evolution K2's readers must accept."""
    return _v2_changed(lambda s: s["fields"].append(OPTIONAL_VENUE))


def _v2_id(client: SchemaRegistryClient) -> int:
    return client.get_latest_version(EXCHANGES[0].subject).schema_id


def _avro(text: str) -> Schema:
    return Schema(text, "AVRO")


def test_v2_is_registered_under_every_exchange_subject(client: SchemaRegistryClient) -> None:
    assert {e.subject for e in EXCHANGES} <= set(client.get_subjects())
    ids = set()
    for config in EXCHANGES:
        latest = client.get_latest_version(config.subject)
        assert latest.version == 1
        assert json.loads(latest.schema.schema_str) == trade_v2_schema()
        ids.add(latest.schema_id)
    assert len(ids) == 1, "the same schema must have one global id in every subject"
    assert json.loads(client.get_schema(ids.pop()).schema_str) == trade_v2_schema()


def test_same_schema_gets_the_same_id_in_any_subject(client: SchemaRegistryClient) -> None:
    subject = _subject("copy")
    reformatted = json.dumps(trade_v2_schema(), indent=4, sort_keys=True)  # other text, same schema
    assert client.register_schema(subject, _avro(reformatted)) == _v2_id(client)
    assert client.get_versions(subject) == [1]
    found = client.lookup_schema(subject, _avro(trade_v2_schema_str()))
    assert (found.schema_id, found.version) == (_v2_id(client), 1)

    def respell(schema: dict[str, Any]) -> None:
        """The same schema spelled otherwise: a full name instead of a namespace, a type as an object."""
        schema["name"] = f"{schema.pop('namespace')}.{schema['name']}"
        _field(schema, "symbol")["type"] = {"type": "string"}

    assert client.register_schema(_subject("respelled"), _avro(_v2_changed(respell))) == _v2_id(client)


def _trade(**extra: Any) -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "trade_id": "KRAKEN-42",
        "symbol": "BTCUSD",
        "exchange": "KRAKEN",
        "asset_class": "crypto",
        "timestamp": dt.datetime(2026, 1, 20, 14, 0, 0, 1, tzinfo=dt.UTC),
        "price": decimal.Decimal("97000.50000000"),
        "quantity": decimal.Decimal("1.25000000"),
        "currency": "USD",
        "side": "BUY",
        "trade_conditions": [],
        "source_sequence": None,
        "ingestion_timestamp": dt.datetime(2026, 1, 20, 14, 0, 1, tzinfo=dt.UTC),
        "platform_sequence": 7,
        "vendor_data": {"pair": "XBT/USD", "order_type": "limit"},
        **extra,
    }


def test_evolved_schema_is_a_new_version_and_v2_readers_decode_it(client: SchemaRegistryClient) -> None:
    subject = _subject("evolution")
    topic = subject.removesuffix("-value")
    ctx = SerializationContext(topic, MessageField.VALUE)
    assert client.register_schema(subject, _avro(trade_v2_schema_str())) == _v2_id(client)

    written = AvroSerializer(client, _v3())(_trade(venue="XKRA"), ctx)  # auto-registers V3
    v3_id = int.from_bytes(written[1:5], "big")
    assert v3_id != _v2_id(client)
    assert client.get_versions(subject) == [1, 2]
    latest = client.get_latest_version(subject)
    assert (latest.version, latest.schema_id) == (2, v3_id)

    as_v2 = AvroDeserializer(client, trade_v2_schema_str())(written, ctx)
    assert as_v2 == _trade(message_id=as_v2["message_id"])
    assert "venue" not in as_v2
    as_written = AvroDeserializer(client)(written, ctx)
    assert as_written["venue"] == "XKRA"


INCOMPATIBLE_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "new required field": lambda s: s["fields"].append({"name": "venue", "type": "string"}),
    "field type changed": lambda s: _field(s, "symbol").update(type="int"),
    "enum symbol removed": lambda s: _field(s, "side")["type"]["symbols"].remove("SELL_SHORT"),
    "decimal scale changed": lambda s: _field(s, "price")["type"].update(scale=2),
    "optional made required": lambda s: _field(s, "source_sequence").update(type="long", default=0),
}

COMPATIBLE_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "optional field added": lambda s: s["fields"].append(OPTIONAL_VENUE),
    "field removed": lambda s: s["fields"].remove(_field(s, "currency")),
    "enum symbol added": lambda s: _field(s, "side")["type"]["symbols"].append("BUY_COVER"),
    "union widened": lambda s: _field(s, "source_sequence").update(type=["null", "long", "string"]),
    "field renamed with alias": lambda s: _field(s, "currency").update(name="quote", aliases=["currency"]),
}


@pytest.fixture(scope="module")
def v2_subject(devstack_home: Path) -> str:
    """A subject holding only V2, for changes that are checked but must not be registered."""
    subject = _subject("compat")
    url = read_env_file(devstack_home / "devstack.env")[SCHEMA_REGISTRY_URL]
    with SchemaRegistryClient({"url": url, "max.retries": 0}) as registry:
        registry.register_schema(subject, _avro(trade_v2_schema_str()))
    return subject


@pytest.mark.parametrize("change", INCOMPATIBLE_CHANGES, ids=list(INCOMPATIBLE_CHANGES))
def test_incompatible_schema_is_refused_with_409(
    client: SchemaRegistryClient, v2_subject: str, change: str
) -> None:
    candidate = _avro(_v2_changed(INCOMPATIBLE_CHANGES[change]))
    assert client.test_compatibility(v2_subject, candidate) is False
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(v2_subject, candidate)
    assert (refused.value.http_status_code, refused.value.error_code) == (409, 409)
    assert client.get_versions(v2_subject) == [1]


@pytest.mark.parametrize("change", COMPATIBLE_CHANGES, ids=list(COMPATIBLE_CHANGES))
def test_backward_compatible_changes_pass_the_check(
    client: SchemaRegistryClient, v2_subject: str, change: str
) -> None:
    candidate = _avro(_v2_changed(COMPATIBLE_CHANGES[change]))
    assert client.test_compatibility(v2_subject, candidate) is True


def _error(call: Callable[[], object]) -> tuple[int, int]:
    with pytest.raises(SchemaRegistryError) as failed:
        call()
    return failed.value.http_status_code, failed.value.error_code


def test_unknown_ids_subjects_and_versions_give_confluent_error_codes(client: SchemaRegistryClient) -> None:
    assert _error(lambda: client.get_schema(987654)) == (404, 40403)
    assert _error(lambda: client.get_latest_version("k2-test-no-such-subject")) == (404, 40401)
    assert _error(lambda: client.get_version(EXCHANGES[0].subject, 99)) == (404, 40402)
    assert _error(lambda: client.register_schema(_subject("bad"), _avro('{"type": "record"}'))) == (
        422,
        42201,
    )
    assert _error(lambda: client.register_schema(_subject("bad"), _avro("not json"))) == (422, 42201)
    not_registered = _avro(_v3())
    assert _error(lambda: client.lookup_schema(EXCHANGES[0].subject, not_registered)) == (404, 40403)


def test_errors_use_confluent_json_and_content_type(
    devstack_env: dict[str, str], client: SchemaRegistryClient
) -> None:
    url = f"{devstack_env[SCHEMA_REGISTRY_URL]}/schemas/ids/987654"
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(url, timeout=5)
    assert answer.value.code == 404
    assert answer.value.headers["Content-Type"] == "application/vnd.schemaregistry.v1+json"
    body = json.loads(answer.value.read())
    assert body["error_code"] == 40403 and "987654" in body["message"]
    raw_url = f"{devstack_env[SCHEMA_REGISTRY_URL]}/schemas/ids/{_v2_id(client)}/schema"
    with urllib.request.urlopen(raw_url, timeout=5) as raw:
        assert json.loads(raw.read()) == trade_v2_schema()


def test_compatibility_levels_are_global_and_per_subject(client: SchemaRegistryClient) -> None:
    assert client.get_compatibility() == "BACKWARD"
    subject = _subject("levels")
    client.register_schema(subject, _avro(trade_v2_schema_str()))
    required = _avro(_v2_changed(INCOMPATIBLE_CHANGES["new required field"]))
    assert _error(lambda: client.get_compatibility(subject)) == (404, 40408)

    assert client.set_compatibility(subject, "NONE") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"
    assert client.register_schema(subject, required) != _v2_id(client)
    assert client.get_versions(subject) == [1, 2]

    client.set_compatibility(subject, "FORWARD")
    # FORWARD: the previous schema must read the new one's data; dropping a required field breaks it.
    dropped = _avro(_v2_changed(lambda s: s["fields"].remove(_field(s, "symbol"))))
    assert _error(lambda: client.register_schema(subject, dropped)) == (409, 409)
    assert client.delete_config(subject).compatibility_level.value == "FORWARD"
    assert client.get_compatibility() == "BACKWARD"
    assert _error(lambda: client.set_compatibility(subject, "SIDEWAYS")) == (422, 42203)


def test_soft_and_permanent_deletes(client: SchemaRegistryClient) -> None:
    subject = _subject("delete")
    client.register_schema(subject, _avro(trade_v2_schema_str()))
    v3_id = client.register_schema(subject, _avro(_v3()))
    assert client.delete_version(subject, 2) == 2
    assert client.get_versions(subject) == [1]
    assert client.get_versions(subject, deleted=True) == [1, 2]
    assert json.loads(client.get_schema(v3_id).schema_str)["fields"][-1] == OPTIONAL_VENUE  # old data decodes
    assert _error(lambda: client.delete_subject(subject, permanent=True)) == (404, 40405)
    assert client.delete_subject(subject) == [1]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    assert client.delete_subject(subject, permanent=True) == [1, 2]
    assert subject not in client.get_subjects(deleted=True)


def test_concurrent_registrations_share_ids_and_are_persisted(
    devstack_env: dict[str, str], devstack_home: Path
) -> None:
    variants = [
        _v2_changed(lambda s, i=i: s["fields"].append({**OPTIONAL_VENUE, "name": f"x{i}"})) for i in range(4)
    ]
    jobs = [(_subject(f"concurrent-{n}"), variants[n % 4]) for n in range(16)]

    def register(job: tuple[str, str]) -> int:
        with SchemaRegistryClient({"url": devstack_env[SCHEMA_REGISTRY_URL], "max.retries": 0}) as registry:
            return registry.register_schema(job[0], _avro(job[1]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(register, jobs))
    ids_by_schema: dict[str, set[int]] = {}
    for (_, text), schema_id in zip(jobs, ids, strict=True):
        ids_by_schema.setdefault(text, set()).add(schema_id)
    assert all(len(found) == 1 for found in ids_by_schema.values()), ids_by_schema
    assert len(set(ids)) == 4

    state = json.loads((devstack_home / "devstack" / "registry.json").read_text())
    assert set(ids) <= {int(schema_id) for schema_id in state["schemas"]}
    assert state["next_id"] > max(ids)
    assert all(subject in state["subjects"] for subject, _ in jobs)


def _parsed(schema: Any) -> Any:
    return parse_avro(json.dumps(schema))


def test_resolution_rules_for_recursion_promotion_and_enum_defaults() -> None:
    """Avro rules the V2 cases above do not reach: recursive types, promotions, enum defaults."""
    node = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "value", "type": "int"}, {"name": "next", "type": ["null", "Node"]}],
    }
    wider = copy.deepcopy(node)
    wider["fields"][0]["type"] = "long"
    assert incompatibilities(_parsed(wider), _parsed(node)) == []  # int data read as long
    assert incompatibilities(_parsed(node), _parsed(wider)) != []  # long data read as int
    enum = {"type": "enum", "name": "Side", "symbols": ["BUY"]}
    assert incompatibilities(_parsed(enum), _parsed({**enum, "symbols": ["BUY", "SELL"]})) != []
    with_default = {**enum, "default": "BUY"}
    assert incompatibilities(_parsed(with_default), _parsed({**enum, "symbols": ["BUY", "SELL"]})) == []
