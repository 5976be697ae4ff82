"""Table maintenance for every K2 table, with Iceberg's own Spark procedures (k2_resources/spark.py)."""
