"""A Confluent-compatible Schema Registry (AVRO only) for the embedded dev stack.

Confluent's registry cannot be installed here, and `confluent_kafka`'s `mock://` registry lives inside
one process, while K2's producers, Dagster runs and tests are separate processes that must agree on
schema ids. This module serves the REST subset that confluent-kafka 2.16's `SchemaRegistryClient`,
`AvroSerializer` and `AvroDeserializer` call, with Confluent's paths, JSON fields and error codes, so the
same client code runs against this and a real registry.

What it keeps from the real thing, because the pipeline depends on it:
- ids are global and stable: the same schema (compared in parsed form) gets the same id in any subject,
  and state survives restarts (`registry.json`, replaced atomically after every change);
- compatibility is enforced on registration (BACKWARD by default, as in the predecessor's production)
  with Avro's schema-resolution rules, so an incompatible producer is refused with 409 here too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import fastavro

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
AVRO = "AVRO"
DEFAULT_COMPATIBILITY = "BACKWARD"
COMPATIBILITY_LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
MAX_VERSION = 2**31 - 1

# Confluent's error codes (io.confluent.kafka.schemaregistry.rest.exceptions.Errors).
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
SUBJECT_SOFT_DELETED = 40404
SUBJECT_NOT_SOFT_DELETED = 40405
VERSION_SOFT_DELETED = 40406
VERSION_NOT_SOFT_DELETED = 40407
SUBJECT_LEVEL_COMPATIBILITY_NOT_CONFIGURED = 40408
INCOMPATIBLE_SCHEMA = 409
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
INVALID_COMPATIBILITY_LEVEL = 42203
REFERENCE_EXISTS = 42206
INTERNAL_ERROR = 50001


class RegistryError(Exception):
    """An error answered to the client as Confluent does: an HTTP status plus {error_code, message}."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error_code": self.error_code, "message": self.message}


def _subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.")


def _version_not_found(subject: str, version: int | str) -> RegistryError:
    return RegistryError(404, VERSION_NOT_FOUND, f"Version {version} not found for subject '{subject}'.")


def _schema_not_found(detail: str = "Schema not found") -> RegistryError:
    return RegistryError(404, SCHEMA_NOT_FOUND, detail)


def _invalid_schema(detail: str) -> RegistryError:
    return RegistryError(422, INVALID_SCHEMA, f"Invalid schema: {detail}")


# --------------------------------------------------------------------------------------------------
# Avro schemas: parsing, identity and schema resolution (compatibility)
# --------------------------------------------------------------------------------------------------

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
COMPLEX = frozenset({"record", "error", "enum", "fixed", "array", "map"})
# Avro's promotions: data written as the key type can be read as any of these types.
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


@dataclass(frozen=True)
class ParsedSchema:
    """A validated Avro schema: its fastavro form, every named type it can see, and its identity key."""

    text: str
    references: tuple[tuple[str, str, int], ...]
    parsed: Any
    names: dict[str, Any]
    key: str


def parse_avro(
    text: str, references: Iterable[tuple[str, str, int]] = (), referenced: Iterable[ParsedSchema] = ()
) -> ParsedSchema:
    """Validate `text` (raising 42201 on any fault) and compute the key that decides schema identity.

    The key is the parsed form (full names, no namespaces, `{"type": "int"}` collapsed to `"int"`)
    dumped with sorted keys, so whitespace, key order and namespace spelling do not make a new id,
    while docs, defaults and field order, which change what the schema means, do.
    """
    try:
        raw = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise _invalid_schema(f"not valid JSON: {err}") from err
    names: dict[str, Any] = {}
    for schema in referenced:
        names.update(schema.names)
    try:
        parsed = fastavro.parse_schema(raw, named_schemas=names, _write_hint=False)
    except Exception as err:  # fastavro raises several types for malformed schemas; all mean 42201.
        raise _invalid_schema(str(err) or type(err).__name__) from err
    _check_unique_field_names(parsed)
    refs = tuple(references)
    key = json.dumps(
        [_normalised(parsed), [list(ref) for ref in refs]], sort_keys=True, separators=(",", ":")
    )
    return ParsedSchema(text=text, references=refs, parsed=parsed, names=dict(names), key=key)


def _normalised(schema: Any) -> Any:
    """The parsed schema with spelling-only differences removed (see `parse_avro`)."""
    if isinstance(schema, list):
        return [_normalised(branch) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    if set(schema) == {"type"} and isinstance(schema["type"], str):
        return schema["type"]
    return {key: _normalised(value) for key, value in schema.items() if not key.startswith("__")}


def _check_unique_field_names(schema: Any) -> None:
    """fastavro accepts a record with two fields of one name; Avro (and Confluent) do not."""
    if isinstance(schema, list):
        for branch in schema:
            _check_unique_field_names(branch)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") in ("record", "error"):
        seen: set[str] = set()
        for item in schema.get("fields", []):
            if item["name"] in seen:
                raise _invalid_schema(f"record {schema.get('name')} has two fields named {item['name']}")
            seen.add(item["name"])
            _check_unique_field_names(item["type"])
    for key in ("items", "values"):
        if key in schema:
            _check_unique_field_names(schema[key])


def incompatibilities(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why data written with `writer` cannot be read with `reader` (empty: it can), per Avro resolution."""
    return _Resolution(reader.names, writer.names).check(reader.parsed, writer.parsed, "")


def _deref(schema: Any, names: dict[str, Any]) -> Any:
    """Replace a reference to a named type by its definition, so every node can be inspected."""
    if isinstance(schema, str) and schema not in PRIMITIVES:
        return names[schema]
    if isinstance(schema, dict):
        inner = schema.get("type")
        if isinstance(inner, str) and inner not in PRIMITIVES and inner not in COMPLEX:
            return names[inner]
        if isinstance(inner, dict | list):
            return _deref(inner, names)
    return schema


def _type_name(schema: Any) -> str:
    name = schema if isinstance(schema, str) else schema["type"]
    return "record" if name == "error" else name


def _short_name(fullname: str) -> str:
    return fullname.rsplit(".", 1)[-1]


def _aliases(schema: dict[str, Any]) -> set[str]:
    """A named type's aliases as full names (unqualified aliases take the type's namespace)."""
    namespace = schema["name"].rsplit(".", 1)[0] if "." in schema["name"] else ""
    return {
        alias if "." in alias or not namespace else f"{namespace}.{alias}"
        for alias in schema.get("aliases", [])
    }


def _decimal_issues(reader: Any, writer: Any, path: str) -> list[str]:
    """Avro ignores logical types when resolving, but a decimal read at another scale is silently wrong.

    K2 stores prices as decimal(18, 8): a writer at scale 8 read as scale 2 would multiply every price by
    10^6 without an error anywhere, so this registry refuses scale changes and precision reductions.
    """
    if not (isinstance(reader, dict) and isinstance(writer, dict)):
        return []
    if reader.get("logicalType") != "decimal" or writer.get("logicalType") != "decimal":
        return []
    issues = []
    if reader.get("scale", 0) != writer.get("scale", 0):
        issues.append(
            f"{path or '/'}: decimal scale {writer.get('scale', 0)} is read as scale {reader.get('scale', 0)}"
        )
    if reader.get("precision", 0) < writer.get("precision", 0):
        issues.append(
            f"{path or '/'}: decimal precision {writer.get('precision')} is read with smaller precision "
            f"{reader.get('precision')}"
        )
    return issues


@dataclass
class _Resolution:
    """Avro schema resolution (spec, "Schema Resolution"), one reader/writer pair of name tables."""

    reader_names: dict[str, Any]
    writer_names: dict[str, Any]
    # Results per (reader record, writer record); a pair being checked counts as compatible, which
    # ends the recursion of recursive types, and failed union branches keep their failure.
    memo: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def check(self, reader: Any, writer: Any, path: str) -> list[str]:
        reader = _deref(reader, self.reader_names)
        writer = _deref(writer, self.writer_names)
        if isinstance(writer, list):
            return [issue for branch in writer for issue in self.check(reader, branch, path)]
        if isinstance(reader, list):
            return self._reader_union(reader, writer, path)
        reader_type, writer_type = _type_name(reader), _type_name(writer)
        if reader_type != writer_type:
            if reader_type in PROMOTIONS.get(writer_type, frozenset()):
                return []
            return [f"{path or '/'}: writer type {writer_type} cannot be read as {reader_type}"]
        handlers: dict[str, Callable[[Any, Any, str], list[str]]] = {
            "record": self._record,
            "enum": self._enum,
            "fixed": self._fixed,
            "array": lambda r, w, p: self.check(r["items"], w["items"], f"{p}/items"),
            "map": lambda r, w, p: self.check(r["values"], w["values"], f"{p}/values"),
        }
        handler = handlers.get(reader_type)
        return handler(reader, writer, path) if handler else _decimal_issues(reader, writer, path)

    def _reader_union(self, reader: list[Any], writer: Any, path: str) -> list[str]:
        if any(not self.check(branch, writer, path) for branch in reader):
            return []
        return [f"{path or '/'}: writer type {_type_name(writer)} matches no branch of the reader's union"]

    def _names_match(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> list[str]:
        if _short_name(reader["name"]) == _short_name(writer["name"]) or writer["name"] in _aliases(reader):
            return []
        return [f"{path or '/'}: writer type {writer['name']} does not match reader type {reader['name']}"]

    def _record(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> list[str]:
        key = (reader["name"], writer["name"])
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = []
        issues = self._names_match(reader, writer, path) or self._fields(reader, writer, path)
        self.memo[key] = issues
        return issues

    def _fields(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> list[str]:
        written = {item["name"]: item for item in writer["fields"]}
        issues: list[str] = []
        for item in reader["fields"]:
            names = [item["name"], *item.get("aliases", [])]
            source = next((written[name] for name in names if name in written), None)
            field_path = f"{path}/{item['name']}"
            if source is not None:
                issues += self.check(item["type"], source["type"], field_path)
            elif "default" not in item:
                issues.append(f"{field_path}: reader field has no default and the writer does not write it")
        return issues

    def _enum(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> list[str]:
        issues = self._names_match(reader, writer, path)
        missing = [symbol for symbol in writer["symbols"] if symbol not in reader["symbols"]]
        if missing and "default" not in reader:
            issues.append(
                f"{path or '/'}: enum {reader['name']} lacks writer symbols {missing} and has no default"
            )
        return issues

    def _fixed(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> list[str]:
        issues = self._names_match(reader, writer, path)
        if reader["size"] != writer["size"]:
            issues.append(
                f"{path or '/'}: fixed size {writer['size']} cannot be read as size {reader['size']}"
            )
        return issues + _decimal_issues(reader, writer, path)


# --------------------------------------------------------------------------------------------------
# The store: subjects, versions, global ids, compatibility configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class StoredSchema:
    """One schema under its global id; subjects point at it from their versions."""

    id: int
    guid: str
    text: str
    references: list[dict[str, Any]]
    key: str
    schema_type: str = AVRO

    def fields(self) -> dict[str, Any]:
        """The schema as Confluent returns it: schemaType and references only when not the default."""
        result: dict[str, Any] = {"schema": self.text}
        if self.schema_type != AVRO:
            result["schemaType"] = self.schema_type
        if self.references:
            result["references"] = self.references
        return result


@dataclass
class SubjectVersion:
    version: int
    schema_id: int
    deleted: bool = False


@dataclass(frozen=True)
class Candidate:
    """A schema from a request body, parsed and with its references resolved."""

    parsed: ParsedSchema
    references: list[dict[str, Any]]


class SchemaStore:
    """All registry state behind one lock; every change is written to `path` before it is answered."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._schemas: dict[int, StoredSchema] = {}
        self._subjects: dict[str, list[SubjectVersion]] = {}
        self._global_level = DEFAULT_COMPATIBILITY
        self._subject_levels: dict[str, str] = {}
        self._next_id = 1
        self._parsed: dict[int, ParsedSchema] = {}
        if path is not None and path.exists():
            self._load(path)

    # -- persistence ----------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        """Read the state file; a corrupt file is an error, never silently reset (ids must not move)."""
        state = json.loads(path.read_text())
        self._next_id = int(state["next_id"])
        self._global_level = state["config"]["global"]
        self._subject_levels = dict(state["config"]["subjects"])
        self._schemas = {int(sid): StoredSchema(**item) for sid, item in state["schemas"].items()}
        self._subjects = {
            subject: [SubjectVersion(**entry) for entry in entries]
            for subject, entries in state["subjects"].items()
        }

    def _save(self) -> None:
        """Write temp file + fsync + os.replace: a crash leaves the old or the new state, never half."""
        if self._path is None:
            return
        state = {
            "next_id": self._next_id,
            "config": {"global": self._global_level, "subjects": self._subject_levels},
            "schemas": {str(sid): vars(item) for sid, item in self._schemas.items()},
            "subjects": {
                subject: [vars(entry) for entry in entries] for subject, entries in self._subjects.items()
            },
        }
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(state, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- lookups --------------------------------------------------------------------------------

    def _versions(self, subject: str, deleted: bool = False) -> list[SubjectVersion]:
        return [entry for entry in self._subjects.get(subject, []) if deleted or not entry.deleted]

    def _version(self, subject: str, version: int | str, deleted: bool = False) -> SubjectVersion:
        """One version of a subject; `latest` is the newest live one. 40401/40402 as Confluent."""
        if subject not in self._subjects or not self._versions(subject, deleted=True):
            raise _subject_not_found(subject)
        number = parse_version(version)
        entries = self._versions(subject, deleted)
        if number == -1:
            if not entries:
                raise _subject_not_found(subject)
            return entries[-1]
        for entry in entries:
            if entry.version == number:
                return entry
        raise _version_not_found(subject, number)

    def _parsed_schema(self, schema_id: int) -> ParsedSchema:
        """The parsed form of a stored schema, cached: compatibility checks reuse it on every register."""
        if schema_id not in self._parsed:
            stored = self._schemas[schema_id]
            self._parsed[schema_id] = self._parse(stored.text, stored.references, stored.schema_type)
        return self._parsed[schema_id]

    def _parse(self, text: str, references: list[dict[str, Any]], schema_type: str) -> ParsedSchema:
        if schema_type != AVRO:
            raise _invalid_schema(
                f"schema type {schema_type} is not supported by the dev registry (AVRO only)"
            )
        refs, referenced = [], []
        for ref in references:
            name, subject, version = ref.get("name"), ref.get("subject"), ref.get("version")
            if not isinstance(name, str) or not isinstance(subject, str) or not isinstance(version, int):
                raise _invalid_schema(f"reference {ref} needs a name, a subject and an integer version")
            try:
                entry = self._version(subject, version, deleted=True)
            except RegistryError as err:
                raise _invalid_schema(
                    f"reference {name} -> {subject} version {version}: {err.message}"
                ) from err
            refs.append((name, subject, entry.version))
            referenced.append(self._parsed_schema(entry.schema_id))
        return parse_avro(text, refs, referenced)

    def _candidate(self, body: Any) -> Candidate:
        """Validate a request body {schema, schemaType?, references?}; data contracts are refused."""
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("schema"), str)
            or not body["schema"].strip()
        ):
            raise _invalid_schema("the request has no schema")
        unsupported = sorted(key for key in ("metadata", "ruleSet") if body.get(key))
        if unsupported:
            raise _invalid_schema(f"{unsupported} (data contracts) are not supported by the dev registry")
        references = body.get("references") or []
        if not isinstance(references, list):
            raise _invalid_schema("references must be a list")
        parsed = self._parse(body["schema"], references, body.get("schemaType") or AVRO)
        refs = [
            {"name": name, "subject": subject, "version": version}
            for name, subject, version in parsed.references
        ]
        return Candidate(parsed=parsed, references=refs)

    def _live_schema_ids(self, deleted: bool) -> dict[int, list[tuple[str, int]]]:
        """schema id -> (subject, version) pairs that use it, soft-deleted ones included if asked."""
        uses: dict[int, list[tuple[str, int]]] = {}
        for subject, entries in sorted(self._subjects.items()):
            for entry in entries:
                if deleted or not entry.deleted:
                    uses.setdefault(entry.schema_id, []).append((subject, entry.version))
        return uses

    def _version_response(self, subject: str, entry: SubjectVersion) -> dict[str, Any]:
        stored = self._schemas[entry.schema_id]
        return {
            "subject": subject,
            "version": entry.version,
            "id": stored.id,
            "guid": stored.guid,
            **stored.fields(),
        }

    # -- compatibility --------------------------------------------------------------------------

    def compatibility_level(self, subject: str | None) -> str:
        with self._lock:
            return self._subject_levels.get(subject or "", self._global_level)

    def _issues(self, level: str, candidate: ParsedSchema, targets: list[SubjectVersion]) -> list[str]:
        """Compatibility problems of `candidate` against `targets` under `level` (NONE: none)."""
        issues: list[str] = []
        for entry in targets if level != "NONE" else []:
            existing = self._parsed_schema(entry.schema_id)
            if level.startswith(("BACKWARD", "FULL")):
                for issue in incompatibilities(reader=candidate, writer=existing):
                    issues.append(
                        f"new schema cannot read data written with version {entry.version}: {issue}"
                    )
            if level.startswith(("FORWARD", "FULL")):
                for issue in incompatibilities(reader=existing, writer=candidate):
                    issues.append(
                        f"version {entry.version} cannot read data written with the new schema: {issue}"
                    )
        return issues

    def _targets(self, subject: str, level: str) -> list[SubjectVersion]:
        """The versions a new schema is checked against: all live ones if transitive, else the latest."""
        live = self._versions(subject)
        return live if level.endswith("_TRANSITIVE") else live[-1:]

    # -- subjects and versions ------------------------------------------------------------------

    def register(self, subject: str, body: Any) -> dict[str, Any]:
        """POST /subjects/{subject}/versions: the existing version if already there, else a new one."""
        with self._lock:
            candidate = self._candidate(body)
            live = self._versions(subject)
            for entry in live:
                if self._schemas[entry.schema_id].key == candidate.parsed.key:
                    return self._version_response(subject, entry)
            level = self.compatibility_level(subject)
            issues = self._issues(level, candidate.parsed, self._targets(subject, level))
            if issues:
                raise RegistryError(
                    409,
                    INCOMPATIBLE_SCHEMA,
                    f'Schema being registered is incompatible with an earlier schema for subject "{subject}" '
                    f"(compatibility {level}), details: {issues}",
                )
            stored = self._stored_for(candidate)
            entries = self._subjects.setdefault(subject, [])
            entry = SubjectVersion(
                version=max((e.version for e in entries), default=0) + 1, schema_id=stored.id
            )
            entries.append(entry)
            self._save()
            logger.info("registered %s version %d as schema id %d", subject, entry.version, stored.id)
            return self._version_response(subject, entry)

    def _stored_for(self, candidate: Candidate) -> StoredSchema:
        """The stored schema with the candidate's identity, created with the next global id if new."""
        for stored in self._schemas.values():
            if stored.key == candidate.parsed.key:
                return stored
        stored = StoredSchema(
            id=self._next_id,
            guid=str(uuid.uuid4()),
            text=candidate.parsed.text,
            references=candidate.references,
            key=candidate.parsed.key,
        )
        self._schemas[stored.id] = stored
        self._parsed[stored.id] = candidate.parsed
        self._next_id += 1
        return stored

    def lookup(self, subject: str, body: Any, deleted: bool = False) -> dict[str, Any]:
        """POST /subjects/{subject}: which version of the subject is this schema (40401/40403)."""
        with self._lock:
            if not self._versions(subject, deleted=True):
                raise _subject_not_found(subject)
            candidate = self._candidate(body)
            for entry in self._versions(subject, deleted):
                if self._schemas[entry.schema_id].key == candidate.parsed.key:
                    return self._version_response(subject, entry)
            raise _schema_not_found(f"Schema not found under subject '{subject}'")

    def subjects(self, prefix: str = "", deleted: bool = False, deleted_only: bool = False) -> list[str]:
        """GET /subjects: subjects with a live version; `deleted` adds, `deleted_only` keeps, deleted ones."""
        with self._lock:
            result = []
            for subject, entries in sorted(self._subjects.items()):
                has_live = any(not e.deleted for e in entries)
                has_deleted = any(e.deleted for e in entries)
                wanted = has_deleted if deleted_only else has_live or (deleted and has_deleted)
                if wanted and subject.startswith(prefix):
                    result.append(subject)
            return result

    def versions(self, subject: str, deleted: bool = False, deleted_only: bool = False) -> list[int]:
        with self._lock:
            entries = self._subjects.get(subject, [])
            if not entries or not (deleted or deleted_only or any(not e.deleted for e in entries)):
                raise _subject_not_found(subject)
            if deleted_only:
                return [e.version for e in entries if e.deleted]
            return [e.version for e in self._versions(subject, deleted)]

    def version(self, subject: str, version: str, deleted: bool = False) -> dict[str, Any]:
        with self._lock:
            return self._version_response(subject, self._version(subject, version, deleted))

    def referenced_by(self, subject: str, version: str) -> list[int]:
        """Ids of schemas whose references point at this subject version."""
        with self._lock:
            number = self._version(subject, version, deleted=True).version
            uses = self._live_schema_ids(deleted=False)
            return sorted(
                stored.id
                for stored in self._schemas.values()
                if stored.id in uses
                and any(r["subject"] == subject and r["version"] == number for r in stored.references)
            )

    def delete_subject(self, subject: str, permanent: bool = False) -> list[int]:
        """DELETE /subjects/{subject}: soft delete first; permanent only after (Confluent's two steps)."""
        with self._lock:
            entries = self._subjects.get(subject)
            if not entries:
                raise _subject_not_found(subject)
            live = [e for e in entries if not e.deleted]
            if permanent and live:
                raise RegistryError(
                    404,
                    SUBJECT_NOT_SOFT_DELETED,
                    f"Subject '{subject}' must be soft deleted before a permanent delete.",
                )
            if not permanent and not live:
                raise RegistryError(
                    404,
                    SUBJECT_SOFT_DELETED,
                    f"Subject '{subject}' was soft deleted. Set permanent=true to delete.",
                )
            for entry in entries:
                self._refuse_if_referenced(subject, entry.version)
            if permanent:
                del self._subjects[subject]
                self._subject_levels.pop(subject, None)
                deleted = [e.version for e in entries]
            else:
                for entry in live:
                    entry.deleted = True
                deleted = [e.version for e in live]
            self._save()
            return deleted

    def delete_version(self, subject: str, version: str, permanent: bool = False) -> int:
        with self._lock:
            entry = self._version(subject, version, deleted=permanent)
            if permanent and not entry.deleted:
                raise RegistryError(
                    404,
                    VERSION_NOT_SOFT_DELETED,
                    f"Version {entry.version} of subject '{subject}' must be soft deleted before a permanent delete.",
                )
            self._refuse_if_referenced(subject, entry.version)
            if permanent:
                self._subjects[subject].remove(entry)
                if not self._subjects[subject]:
                    del self._subjects[subject]
            else:
                entry.deleted = True
            self._save()
            return entry.version

    def _refuse_if_referenced(self, subject: str, version: int) -> None:
        """Deleting a version that live schemas import would break their decoding: 42206 as Confluent."""
        uses = self._live_schema_ids(deleted=False)
        for stored in self._schemas.values():
            if stored.id in uses and any(
                r["subject"] == subject and r["version"] == version for r in stored.references
            ):
                raise RegistryError(
                    422,
                    REFERENCE_EXISTS,
                    f"Schema id {stored.id} references subject '{subject}' version {version}",
                )

    # -- schemas by id --------------------------------------------------------------------------

    def schema_by_id(self, schema_id: str, subject: str | None = None) -> dict[str, Any]:
        """GET /schemas/ids/{id}: soft-deleted versions still answer, as deserializers need old ids."""
        with self._lock:
            stored, uses = self._stored_in_use(schema_id)
            if subject and subject not in {s for s, _ in uses}:
                raise _schema_not_found(f"Schema {stored.id} not found under subject '{subject}'")
            return {"id": stored.id, "guid": stored.guid, **stored.fields()}

    def schema_by_guid(self, guid: str) -> dict[str, Any]:
        with self._lock:
            for stored in self._schemas.values():
                if stored.guid == guid and stored.id in self._live_schema_ids(deleted=True):
                    return {"id": stored.id, "guid": stored.guid, **stored.fields()}
            raise _schema_not_found(f"Schema {guid} not found")

    def _stored_in_use(self, schema_id: str) -> tuple[StoredSchema, list[tuple[str, int]]]:
        """A stored schema still used by some subject version (permanently deleted ones are gone)."""
        number = int(schema_id) if re.fullmatch(r"-?\d+", schema_id) else None
        uses = self._live_schema_ids(deleted=True)
        if number is None or number not in self._schemas or number not in uses:
            raise _schema_not_found(f"Schema {schema_id} not found")
        return self._schemas[number], uses[number]

    def subjects_for_id(self, schema_id: str, subject: str | None = None, deleted: bool = False) -> list[str]:
        return sorted({s for s, _ in self.versions_for_id(schema_id, subject, deleted)})

    def versions_for_id(
        self, schema_id: str, subject: str | None = None, deleted: bool = False
    ) -> list[tuple[str, int]]:
        with self._lock:
            stored, _ = self._stored_in_use(schema_id)
            uses = self._live_schema_ids(deleted).get(stored.id, [])
            return [(s, v) for s, v in uses if subject is None or s == subject]

    # -- configuration --------------------------------------------------------------------------

    def get_config(self, subject: str | None, default_to_global: bool = False) -> dict[str, str]:
        """GET /config[/{subject}]: a subject without its own level is 40408 unless defaultToGlobal."""
        with self._lock:
            if subject is None:
                return {"compatibilityLevel": self._global_level}
            if subject in self._subject_levels:
                return {"compatibilityLevel": self._subject_levels[subject]}
            if default_to_global:
                return {"compatibilityLevel": self._global_level}
            raise RegistryError(
                404,
                SUBJECT_LEVEL_COMPATIBILITY_NOT_CONFIGURED,
                f"Subject '{subject}' does not have subject-level compatibility configured",
            )

    def set_config(self, subject: str | None, body: Any) -> dict[str, str]:
        """PUT /config[/{subject}] with {"compatibility": LEVEL} (or compatibilityLevel)."""
        level = (
            (body.get("compatibility") or body.get("compatibilityLevel")) if isinstance(body, dict) else None
        )
        if not isinstance(level, str) or level.upper() not in COMPATIBILITY_LEVELS:
            raise RegistryError(
                422,
                INVALID_COMPATIBILITY_LEVEL,
                f"Invalid compatibility level {level!r}. Valid values are {', '.join(COMPATIBILITY_LEVELS)}",
            )
        with self._lock:
            if subject is None:
                self._global_level = level.upper()
            else:
                self._subject_levels[subject] = level.upper()
            self._save()
            return {"compatibility": level.upper()}

    def delete_config(self, subject: str | None) -> dict[str, str]:
        """DELETE /config[/{subject}]: back to the global level (global: back to BACKWARD)."""
        with self._lock:
            previous = self.get_config(subject)
            if subject is None:
                self._global_level = DEFAULT_COMPATIBILITY
            else:
                del self._subject_levels[subject]
            self._save()
            return previous

    def test_compatibility(
        self, subject: str, version: str | None, body: Any, verbose: bool = False
    ) -> dict[str, Any]:
        """POST /compatibility/subjects/{subject}/versions[/{version}]: check without registering.

        With a version: against that version (`latest` with no versions is compatible, as Confluent);
        without: against the versions the subject's level names (all if transitive, else the latest).
        """
        with self._lock:
            candidate = self._candidate(body)
            level = self.compatibility_level(subject)
            if version is None:
                targets = self._targets(subject, level)
            elif parse_version(version) == -1 and not self._versions(subject):
                targets = []
            else:
                targets = [self._version(subject, version)]
            issues = self._issues(level, candidate.parsed, targets)
            result: dict[str, Any] = {"is_compatible": not issues}
            if verbose:
                result["messages"] = issues
            return result


def parse_version(version: int | str) -> int:
    """A version number, or -1 for `latest`; anything else is 42202 as in Confluent."""
    if isinstance(version, int):
        number = version
    elif version == "latest":
        return -1
    elif re.fullmatch(r"-?\d+", version):
        number = int(version)
    else:
        number = 0
    if number == -1 or 1 <= number <= MAX_VERSION:
        return number
    raise RegistryError(
        422,
        INVALID_VERSION,
        f"The specified version '{version}' is not a valid version id. Allowed values are between "
        f'[1, {MAX_VERSION}] and the string "latest"',
    )


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a route handler sees: decoded path parameters, the query and the JSON body."""

    params: dict[str, str]
    query: dict[str, list[str]]
    body: Any

    def text(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        """Booleans arrive as `true`, `True` (the client formats Python bools) or `false`."""
        return (self.text(name) or "").lower() == "true"

    def integer(self, name: str, default: int) -> int:
        value = self.text(name)
        return int(value) if value and re.fullmatch(r"-?\d+", value) else default


Handler = Callable[[SchemaStore, Request], Any]


def _page(items: list[Any], request: Request) -> list[Any]:
    """offset/limit pagination; a negative limit means all, as in the client's defaults."""
    offset, limit = max(request.integer("offset", 0), 0), request.integer("limit", -1)
    return items[offset:] if limit < 0 else items[offset : offset + limit]


def _raw_schema(response: dict[str, Any]) -> Any:
    """The `/schema` endpoints answer the schema itself, not a string holding it."""
    return json.loads(response["schema"])


def _routes() -> list[tuple[str, re.Pattern[str], Handler]]:
    """The REST API, as (method, path pattern, handler); path parameters are URL-decoded."""
    p = re.compile
    sub, ver, sid = r"(?P<subject>[^/]+)", r"(?P<version>[^/]+)", r"(?P<id>[^/]+)"
    return [
        ("GET", p(r"/"), lambda s, r: {}),
        ("GET", p(r"/schemas/types"), lambda s, r: [AVRO]),
        ("GET", p(rf"/schemas/ids/{sid}"), lambda s, r: s.schema_by_id(r.params["id"], r.text("subject"))),
        ("GET", p(rf"/schemas/ids/{sid}/schema"), lambda s, r: _raw_schema(s.schema_by_id(r.params["id"]))),
        (
            "GET",
            p(rf"/schemas/ids/{sid}/subjects"),
            lambda s, r: _page(s.subjects_for_id(r.params["id"], r.text("subject"), r.flag("deleted")), r),
        ),
        (
            "GET",
            p(rf"/schemas/ids/{sid}/versions"),
            lambda s, r: _page(
                [
                    {"subject": subject, "version": version}
                    for subject, version in s.versions_for_id(
                        r.params["id"], r.text("subject"), r.flag("deleted")
                    )
                ],
                r,
            ),
        ),
        ("GET", p(r"/schemas/guids/(?P<guid>[^/]+)"), lambda s, r: s.schema_by_guid(r.params["guid"])),
        (
            "GET",
            p(r"/subjects"),
            lambda s, r: _page(
                s.subjects(r.text("subjectPrefix") or "", r.flag("deleted"), r.flag("deleted_only")), r
            ),
        ),
        ("POST", p(rf"/subjects/{sub}/versions"), lambda s, r: s.register(r.params["subject"], r.body)),
        (
            "POST",
            p(rf"/subjects/{sub}"),
            lambda s, r: s.lookup(r.params["subject"], r.body, r.flag("deleted")),
        ),
        (
            "DELETE",
            p(rf"/subjects/{sub}"),
            lambda s, r: s.delete_subject(r.params["subject"], r.flag("permanent")),
        ),
        (
            "GET",
            p(rf"/subjects/{sub}/versions"),
            lambda s, r: _page(s.versions(r.params["subject"], r.flag("deleted"), r.flag("deleted_only")), r),
        ),
        (
            "GET",
            p(rf"/subjects/{sub}/versions/{ver}"),
            lambda s, r: s.version(r.params["subject"], r.params["version"], r.flag("deleted")),
        ),
        (
            "GET",
            p(rf"/subjects/{sub}/versions/{ver}/schema"),
            lambda s, r: _raw_schema(s.version(r.params["subject"], r.params["version"], r.flag("deleted"))),
        ),
        (
            "GET",
            p(rf"/subjects/{sub}/versions/{ver}/referencedby"),
            lambda s, r: _page(s.referenced_by(r.params["subject"], r.params["version"]), r),
        ),
        (
            "DELETE",
            p(rf"/subjects/{sub}/versions/{ver}"),
            lambda s, r: s.delete_version(r.params["subject"], r.params["version"], r.flag("permanent")),
        ),
        ("GET", p(r"/config"), lambda s, r: s.get_config(None)),
        ("PUT", p(r"/config"), lambda s, r: s.set_config(None, r.body)),
        ("DELETE", p(r"/config"), lambda s, r: s.delete_config(None)),
        (
            "GET",
            p(rf"/config/{sub}"),
            lambda s, r: s.get_config(r.params["subject"], r.flag("defaultToGlobal")),
        ),
        ("PUT", p(rf"/config/{sub}"), lambda s, r: s.set_config(r.params["subject"], r.body)),
        ("DELETE", p(rf"/config/{sub}"), lambda s, r: s.delete_config(r.params["subject"])),
        (
            "POST",
            p(rf"/compatibility/subjects/{sub}/versions/{ver}"),
            lambda s, r: s.test_compatibility(
                r.params["subject"], r.params["version"], r.body, r.flag("verbose")
            ),
        ),
        (
            "POST",
            p(rf"/compatibility/subjects/{sub}/versions"),
            lambda s, r: s.test_compatibility(r.params["subject"], None, r.body, r.flag("verbose")),
        ),
    ]


ROUTES = _routes()


def route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    """The handler for a request path; 404 for an unknown path, 405 for a known path and wrong method."""
    path_known = False
    for route_method, pattern, handler in ROUTES:
        match = pattern.fullmatch(path)
        if match:
            path_known = True
            if route_method == method:
                return handler, {key: unquote(value) for key, value in match.groupdict().items()}
    if path_known:
        raise RegistryError(405, 405, f"HTTP 405 Method {method} not allowed on {path}")
    raise RegistryError(404, 404, f"HTTP 404 Not Found: {path}")


class RegistryServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the store; request threads never outlive the process."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: SchemaStore) -> None:
        super().__init__(address, RegistryRequestHandler)
        self.store = store

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class RegistryRequestHandler(BaseHTTPRequestHandler):
    """Dispatches to the routes and answers JSON with Confluent's content type and error form."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its httpx connection
    # Headers and body go out in two writes; with Nagle's algorithm and delayed ACKs each answer on a
    # kept-alive connection then waited ~40 ms. TCP_NODELAY makes a request take about 1 ms.
    disable_nagle_algorithm = True
    server: RegistryServer

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        try:
            body = self._body()
            handler, params = route(method, path)
            request = Request(params=params, query=parse_qs(split.query), body=body)
            self._send(200, handler(self.server.store, request))
        except RegistryError as err:
            logger.info("%s %s -> %d %d %s", method, self.path, err.status, err.error_code, err.message)
            self._send(err.status, err.body())
        except Exception as err:  # an unexpected fault must still answer, in Confluent's form
            logger.exception("%s %s failed", method, self.path)
            self._send(500, {"error_code": INTERNAL_ERROR, "message": f"Internal error: {err}"})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RegistryError(400, 400, f"Malformed JSON request body: {err}") from err

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s - %s", self.address_string(), format % args)


def start_registry_server(store: SchemaStore, host: str = "127.0.0.1", port: int = 0) -> RegistryServer:
    """Bind (port 0 = ephemeral) and serve in a daemon thread; `shutdown()` stops it."""
    server = RegistryServer((host, port), store)
    # A short poll interval makes shutdown() (and so `k2 devstack down`) return quickly.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="schema-registry", daemon=True
    )
    thread.start()
    return server
