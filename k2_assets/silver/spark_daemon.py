"""PySpark's worker daemon with Silver's Spark task code imported once, before it forks workers.

`spark.python.daemon.module` (k2_resources.engine.ENGINE_SPARK_CONFIG) names this module. PySpark's
daemon forks one Python worker per concurrent task; unpickling Silver's task (`RouteTask`) imports
k2_assets.silver.spark_engine and with it Dagster, PyIceberg and pandas, about 5 s of CPU. Imported
here, in the daemon, every forked worker inherits the modules instead of importing them again. The
daemon's protocol (its port on stdout) is PySpark's own: `pyspark.daemon.manager`.
"""

from pyspark.daemon import manager

import k2_assets.silver.spark_engine  # noqa: F401  (imported for the workers the daemon forks)

if __name__ == "__main__":
    manager()
