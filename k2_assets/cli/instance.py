"""Where K2's Dagster instance lives: DAGSTER_HOME = $K2_HOME/dagster_home, holding the repo's dagster.yaml.

One K2_HOME is one whole local deployment: the dev stack's addresses, the Iceberg catalog and
warehouse, and the Dagster instance. Keeping DAGSTER_HOME inside it means `rm -rf $K2_HOME` (`make
clean`) resets everything together and two K2_HOMEs (two test runs, two checkouts) never share run
history. The instance file is copied, not linked, from the repository so an edit to the repo's file
takes effect the next time `k2 dev` / `k2 run` starts, and never half-way through a running daemon.

The SQLite file locates its storage through the K2_HOME environment variable, so this module exports
K2_HOME (absolute) and DAGSTER_HOME into the environment of the calling process: the webserver, the
daemon and every run worker inherit them from there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from k2_resources.settings import HOME, POSTGRES_SETTINGS, k2_home

REPO_ROOT = Path(__file__).resolve().parents[2]
SQLITE_INSTANCE_FILE = REPO_ROOT / "dagster.yaml"
POSTGRES_INSTANCE_FILE = REPO_ROOT / "deploy" / "dagster-postgres.yaml"
WORKSPACE_FILE = REPO_ROOT / "workspace.yaml"
DAGSTER_HOME_DIRNAME = "dagster_home"
# Daemon settings Dagster reads from the environment only (dagster.yaml has no field for them). The run
# retry daemon scans the event log for crashed runs every 5 s by default: every 30 s is a quarter of a
# percent of a core less, and a crashed run is retried at most 25 s later. docker-compose.yml sets the same.
DAEMON_ENVIRONMENT = {"DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "30"}


def instance_file(postgres: bool = False) -> Path:
    """The repository's instance file for the embedded default (SQLite) or a deployment (PostgreSQL)."""
    source = POSTGRES_INSTANCE_FILE if postgres else SQLITE_INSTANCE_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} is missing: K2 must run from a checkout (pip install -e .) so the instance "
            "files next to the package can be found."
        )
    return source


def missing_postgres_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The PostgreSQL settings not set in `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return [setting.name for setting in POSTGRES_SETTINGS if setting.name not in environ]


def prepare_dagster_home(home: Path | None = None, postgres: bool = False) -> Path:
    """Create $K2_HOME/dagster_home with the right dagster.yaml, export K2_HOME and DAGSTER_HOME, return it.

    `home` is the K2_HOME (default: the K2_HOME setting, else ./.k2). With `postgres`, the PostgreSQL
    settings must already be in the environment: failing here names them, where Dagster would only
    say that one environment variable is unset once the webserver starts.
    """
    home = Path(home).resolve() if home is not None else k2_home()
    source = instance_file(postgres)
    if postgres and (missing := missing_postgres_settings()):
        raise RuntimeError(
            f"The PostgreSQL instance needs {', '.join(missing)} in the environment "
            f"(see {POSTGRES_INSTANCE_FILE.relative_to(REPO_ROOT)})."
        )
    dagster_home = home / DAGSTER_HOME_DIRNAME
    dagster_home.mkdir(parents=True, exist_ok=True)
    write_if_changed(dagster_home / "dagster.yaml", source.read_text())
    os.environ[HOME.name] = str(home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    for name, value in DAEMON_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    initialise_storage(dagster_home)
    return dagster_home


def initialise_storage(dagster_home: Path) -> None:
    """Create (or migrate-check) the instance's tables now, from this one process.

    The webserver, the daemon and the code server all open the instance at once when they start; on a
    fresh SQLite home they race to create the schema and can stamp Alembic's version table twice ("more
    than one head present"), after which no process can open the instance again.
    """
    import dagster as dg  # here, so that importing this module stays cheap for every `k2` command

    with dg.DagsterInstance.from_config(str(dagster_home)):
        pass


def write_if_changed(path: Path, text: str) -> None:
    """Replace `path` atomically, and only when its content differs (a running daemon may be reading it)."""
    if path.exists() and path.read_text() == text:
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)
