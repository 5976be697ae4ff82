#!/bin/sh
# Runs once, on the first start of an empty PostgreSQL volume: one database for Dagster's runs and
# events, one for the Iceberg catalog. Names come from the environment (docker-compose.yml).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "$K2_DAGSTER_PG_DB";
CREATE DATABASE "$ICEBERG_CATALOG_DB";
SQL
