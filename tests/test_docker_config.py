"""The Docker deployment, checked without Docker (none can run here).

The compose file is parsed as Compose would (YAML with merge keys, `${VAR:-default}` / `${VAR:?error}`
interpolation from docker/.env, for which .env.example stands in with generated secrets). The K2 code
location is then imported in a process whose environment is exactly the one the container would have
(the image's ENV plus the service's `environment:`), every resource is built, and the Iceberg catalog
must be the REST catalog on MinIO from that environment, not the SQLite default: an unset or misspelt
variable would silently send production data to a local file.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_assets.cli.instance import DAEMON_ENVIRONMENT, POSTGRES_INSTANCE_FILE, REPO_ROOT
from k2_resources.exchanges import EXCHANGES

DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
CODE_SERVICE = "k2-code"
DAGSTER_SERVICES = ("k2-code", "dagster-webserver", "dagster-daemon")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
ONLY_A_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads a .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: `${V}`, `${V:-d}`, `${V-d}`, `${V:?msg}`, `${V?msg}`, and `$$` -> `$`."""

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        value = variables.get(name)
        if operator in (":-", "-"):
            unset = value is None or (operator == ":-" and value == "")
            return argument if unset else value
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            raise ValueError(f"required variable {name} is missing: {argument}")
        return value or ""

    placeholder = "\0dollar\0"
    return INTERPOLATION.sub(substitute, text.replace("$$", placeholder)).replace(placeholder, "$")


# Empty in .env.example because empty means "not used" (a Spark Connect address instead of a master).
OPTIONAL_EMPTY = ("K2_SPARK_REMOTE",)


def deployment_variables() -> dict[str, str]:
    """.env.example as an operator fills it: every other empty (secret) value replaced by a generated one."""
    return {
        k: v or ("" if k in OPTIONAL_EMPTY else f"generated-{secrets.token_hex(16)}")
        for k, v in read_dotenv(ENV_EXAMPLE).items()
    }


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    environment = compose()["services"][service].get("environment") or {}
    assert isinstance(environment, dict), f"{service}: use the mapping form of environment"
    return {key: interpolate(str(value), variables) for key, value in environment.items()}


def image_environment() -> dict[str, str]:
    """The ENV of docker/Dockerfile (continuation lines joined), as every container starts with."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for pair in line.strip()[4:].split():
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def container_environment(service: str, variables: dict[str, str]) -> dict[str, str]:
    return {**image_environment(), **service_environment(service, variables)}


RESOLVE_RESOURCES = r"""
import json, sys
import dagster as dg
from pyiceberg.catalog import _ENV_CONFIG
from k2_assets.definitions import defs

repository = defs.get_repository_def()
resources = repository.get_top_level_resources()
report = {"resources": sorted(resources)}
with dg.build_resources(resources) as built:
    iceberg = built.iceberg
    report["kafka"] = built.kafka.bootstrap_servers
    report["schema_registry"] = built.schema_registry.url
    report["iceberg_resolved"] = iceberg.resolved_properties()
    report["iceberg_effective"] = {**(_ENV_CONFIG.get_catalog_config(iceberg.catalog_name) or {}),
                                   **iceberg.resolved_properties()}
    report["io_manager"] = type(built.iceberg_io_manager).__name__
    report["engine"] = built.engine.choice
    report["engine_spark"] = built.engine.spark.full_config()
report["sensors"] = {s.name: s.default_status.value for s in repository.sensor_defs}
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def variables() -> dict[str, str]:
    return deployment_variables()


@pytest.fixture(scope="module")
def resolved(variables: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every resource of the code location, built in a process with exactly the container's environment.

    The working directory is empty: with no K2_HOME, K2's local state would go to ./.k2, so nothing of
    this machine's dev stack can leak in.
    """
    env = container_environment(CODE_SERVICE, variables)
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE_RESOURCES],
        env=env,
        cwd=tmp_path_factory.mktemp("container"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {"report": json.loads(done.stdout), "env": env}


def test_code_location_builds_every_resource_from_the_compose_environment(
    resolved: dict[str, Any], variables: dict[str, str]
) -> None:
    report = resolved["report"]
    assert report["resources"] == [
        "alert_webhook",
        "engine",
        "iceberg",
        "iceberg_io_manager",
        "kafka",
        "schema_registry",
        "spark",
    ]
    assert report["kafka"] == "kafka:9092"
    assert report["schema_registry"] == "http://schema-registry:8081"
    assert report["io_manager"] == "EngineIOManager"
    # All sensors and schedules start running in production (K2_AUTOMATION=on by default), except the
    # live exchange feeds: going live is starting their sensors.
    feeds = {name: status for name, status in report["sensors"].items() if name.endswith("_feed_sensor")}
    assert feeds and set(feeds.values()) == {"STOPPED"}, feeds
    others = {name: status for name, status in report["sensors"].items() if name not in feeds}
    assert set(others.values()) == {"RUNNING"}, others


def test_iceberg_catalog_is_the_rest_catalog_on_minio_not_the_sqlite_default(
    resolved: dict[str, Any], variables: dict[str, str]
) -> None:
    effective = resolved["report"]["iceberg_effective"]
    assert not any("sqlite" in str(v) for v in resolved["report"]["iceberg_resolved"].values())
    assert effective.get("type") == "rest", effective
    assert effective["uri"] == "http://iceberg-rest:8181"
    assert effective["s3.endpoint"] == "http://minio:9000"
    assert effective["s3.region"] == variables["K2_S3_REGION"]
    assert effective["s3.access-key-id"] == variables["K2_S3_ACCESS_KEY_ID"]
    assert effective["s3.secret-access-key"] == variables["K2_S3_SECRET_ACCESS_KEY"]
    assert "warehouse" not in effective, "the REST catalog decides the warehouse, not the client"


def test_the_code_location_drives_the_compose_spark_cluster_on_the_same_catalog(
    resolved: dict[str, Any], variables: dict[str, str]
) -> None:
    """K2_ENGINE and K2_SPARK_MASTER reach the engine resource; its Spark catalog is the REST catalog
    with MinIO's settings (path-style, as MinIO serves buckets); the worker registers with the master."""
    report, services = resolved["report"], compose()["services"]
    assert report["engine"] == variables["K2_ENGINE"] == "embedded"
    spark = report["engine_spark"]
    assert spark["spark.master"] == "spark://spark-master:7077" == variables["K2_SPARK_MASTER"]
    assert spark["spark.sql.catalog.k2.type"] == "rest"
    assert spark["spark.sql.catalog.k2.uri"] == "http://iceberg-rest:8181"
    assert spark["spark.sql.catalog.k2.s3.endpoint"] == "http://minio:9000"
    assert spark["spark.sql.catalog.k2.s3.path-style-access"] == "true"
    assert spark["spark.sql.catalog.k2.io-impl"] == "org.apache.iceberg.aws.s3.S3FileIO"
    assert services[CODE_SERVICE]["hostname"] == CODE_SERVICE  # executors connect back to the driver
    worker = [interpolate(str(a), variables) for a in services["spark-worker"]["command"]]
    assert worker[:3] == ["spark-class", "org.apache.spark.deploy.worker.Worker", "spark://spark-master:7077"]
    master = services["spark-master"]["command"]
    assert master[:2] == ["spark-class", "org.apache.spark.deploy.master.Master"] and "7077" in master
    for service in ("spark-master", "spark-worker"):
        assert services[service]["image"] == services[CODE_SERVICE]["image"], "executors run K2's Python"
    assert "openjdk-17-jre-headless" in DOCKERFILE.read_text()


def test_an_existing_cluster_or_spark_connect_by_configuration_alone(variables: dict[str, str]) -> None:
    """docker/.env alone moves K2 to another cluster or to Spark Connect (an empty master is none)."""
    elsewhere = {**variables, "K2_SPARK_MASTER": "", "K2_SPARK_REMOTE": "sc://spark-connect.internal:15002"}
    env = container_environment(CODE_SERVICE, elsewhere)
    assert env["K2_SPARK_MASTER"] == "" and env["K2_SPARK_REMOTE"] == "sc://spark-connect.internal:15002"
    other = container_environment(CODE_SERVICE, {**variables, "K2_SPARK_MASTER": "spark://other:7077"})
    assert other["K2_SPARK_MASTER"] == "spark://other:7077"


def test_every_exchange_topic_is_created_by_kafka_init() -> None:
    """kafka-init runs K2's own topic list (k2_resources/exchanges.py) in the K2 image: no topic is named."""
    init = compose()["services"]["kafka-init"]
    assert init["image"] == compose()["services"][CODE_SERVICE]["image"]
    assert init["command"][:4] == ["python", "-m", "k2_resources.exchanges", "create-topics"], init["command"]
    assert "market.crypto.trades" not in COMPOSE_FILE.read_text()
    listed = subprocess.run(
        [sys.executable, *init["command"][1:3], "topics"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert listed == [e.topic for e in EXCHANGES]


def test_dagster_services_share_the_postgres_instance_settings(variables: dict[str, str]) -> None:
    needed = set(re.findall(r"env: (K2_DAGSTER_PG_\w+)", POSTGRES_INSTANCE_FILE.read_text()))
    assert needed, "the PostgreSQL instance file reads no settings"
    for service in DAGSTER_SERVICES:
        env = container_environment(service, variables)
        assert needed <= set(env), f"{service} lacks {sorted(needed - set(env))}"
        assert env["K2_DAGSTER_PG_HOST"] == "postgres"
        assert env["K2_DAGSTER_PG_PASSWORD"] == variables["POSTGRES_PASSWORD"]
        # The daemon settings `k2 dev` and `k2 run` export: the same in a deployment.
        assert {name: env.get(name) for name in DAEMON_ENVIRONMENT} == DAEMON_ENVIRONMENT
    assert "cp deploy/dagster-postgres.yaml" in DOCKERFILE.read_text()
    workspace = yaml.safe_load((DOCKER_DIR / "workspace.yaml").read_text())
    assert workspace["load_from"] == [
        {"grpc_server": {"host": CODE_SERVICE, "port": 4000, "location_name": "k2"}}
    ]


def test_every_variable_the_compose_file_reads_is_in_env_example() -> None:
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE_FILE.read_text().replace("$$", ""))}
    documented = set(read_dotenv(ENV_EXAMPLE))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_no_secret_is_written_in_docker_files(variables: dict[str, str]) -> None:
    # Secrets are empty in .env.example and required (no default) wherever compose passes them on.
    for name, value in read_dotenv(ENV_EXAMPLE).items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example gives {name} a value"
    for service, spec in compose()["services"].items():
        for name, value in (spec.get("environment") or {}).items():
            if SECRET_NAME.search(name):
                assert ONLY_A_REFERENCE.match(str(value)), f"{service}.{name} is not a bare ${{VAR:?}}"
    # No file under docker/ assigns a literal to a secret-looking name, nor holds a secret value.
    generated = [v for k, v in variables.items() if SECRET_NAME.search(k)]
    assignment = re.compile(r"([A-Z][A-Z0-9_]*)[ \t]*[=:][ \t]*([^\s#]+)")
    for path in sorted(p for p in DOCKER_DIR.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not any(secret in text for secret in generated), path
        for name, value in assignment.findall(text):
            literal = not value.startswith(("${", '"$$', "$$", "<", '"${'))
            assert not (SECRET_NAME.search(name) and literal), f"{path.name}: {name}={value}"


def test_a_missing_secret_stops_compose_instead_of_defaulting() -> None:
    variables = {k: v for k, v in deployment_variables().items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        container_environment(CODE_SERVICE, variables)
