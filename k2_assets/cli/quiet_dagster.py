"""Run a Dagster module as `__main__` (the daemon, the webserver) with its fixed polling slowed down.

`k2 dev` starts Dagster's code server, webserver and daemon through this module:
`python -m k2_assets.cli.quiet_dagster dagster._daemon run -w ...`.

Why: at rest (no browser open, no run going), most of what the daemon, webserver and code server spend
is polling at intervals Dagster hard-codes, not configures (py-spy of a live `k2 dev`, bench/README.md,
"Live cost", session 10):
- the webserver and the daemon each ask the code server for its server id every second, to see a
  restarted code server: three processes working twice a second. `k2 dev` never restarts its code
  server in place (if it exits, `k2 dev` stops), and the UI's "reload" still reloads at once;
- the daemon reloads the whole workspace (the code location's snapshot) every 60 s, for the same reason;
- the sensor and automation daemons wake every 5 s to look up every sensor's state, while K2's sensors
  tick every 60-120 s;
- the code server looks at its run processes twice a second.

The intervals below are module constants of the pinned Dagster (1.13.27), each read where it is used,
at that moment, so setting them before the module runs is enough. `tests/test_quiet_dagster.py` fails
if one of them is gone or no longer read that way: recheck them at any Dagster upgrade.
"""

from __future__ import annotations

import importlib
import runpy
import sys

# (module, constant): seconds. Dagster's values: 1, 60, 5, 5 and 0.5.
SLOWER_POLLING: dict[tuple[str, str], float] = {
    # Server-id poll of the code server, in the webserver and the daemon: a code server `k2 dev`
    # restarted is seen within 30 s instead of 1 s.
    ("dagster._grpc.server_watcher", "WATCH_INTERVAL"): 30,
    # The daemon's reload of the whole workspace; a changed server id reloads it anyway (above).
    # Dagster also waits this long before retrying a run request whose plan missed assets (daemon and
    # code server out of sync, only until the server-id poll sees a restarted code server): such a
    # request is then up to 5 minutes late, once.
    ("dagster._daemon.controller", "RELOAD_WORKSPACE_INTERVAL"): 300,
    # How often the sensor daemon looks for a sensor that is due: each is then evaluated up to 15 s after
    # its minimum interval (up to 5 s before); K2's sensors tick every 60-120 s.
    ("dagster._daemon.sensor", "MIN_INTERVAL_LOOP_TIME"): 15,
    # The same for the automation sensor, whose 4-minute refresh tick is Gold's lag: seen up to 10 s
    # after the tick instead of 5.
    ("dagster._daemon.asset_daemon", "MIN_INTERVAL_LOOP_SECONDS"): 10,
    # The code server's check of its run processes (has one exited without ending its run?), twice a
    # second for the two long-lived ingestion runs: a crashed run is failed up to 5 s after it died.
    ("dagster._grpc.server", "CLEANUP_TICK"): 5,
}


def slow_down_polling() -> None:
    """Set SLOWER_POLLING's constants; refuse to start if the pinned Dagster no longer has one."""
    for (module_name, constant), seconds in SLOWER_POLLING.items():
        module = importlib.import_module(module_name)
        if not isinstance(getattr(module, constant, None), int | float):
            raise RuntimeError(f"{module_name}.{constant} is gone: recheck k2_assets/cli/quiet_dagster.py")
        setattr(module, constant, seconds)


def main() -> None:
    """`python -m k2_assets.cli.quiet_dagster MODULE ARGS...`: MODULE as `python -m MODULE ARGS...`."""
    module, *arguments = sys.argv[1:]
    slow_down_polling()
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
