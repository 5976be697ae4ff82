#!/usr/bin/env bash
# The system services and tools K2's tests need, installed and started on a machine that starts none:
# Debian's PostgreSQL (127.0.0.1:5432, database `test`, user postgres, trusted on loopback only),
# Debian's Chromium for the browser test, and Java + Maven for the Kafka broker of the dev stack.
# Idempotent: what is installed and running is left as it is. Needs root (or sudo) for apt and pg.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v java >/dev/null || { echo "installing Java 17 (Debian) for the Kafka broker"; apt_install openjdk-17-jre-headless; }
command -v mvn >/dev/null || { echo "installing Maven (Debian) to fetch the Kafka jars"; apt_install maven; }
command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser test"; apt_install chromium; }

if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "installing Debian's PostgreSQL"
  apt_install postgresql
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
hba=/etc/postgresql/$version/main/pg_hba.conf
if ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
  # Tests connect as postgres over TCP without a password: trusted on loopback only, first rule wins.
  as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  as_root pg_ctlcluster "$version" main reload 2>/dev/null || true
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $4}' | grep -q online; then
  as_root pg_ctlcluster "$version" main start
fi
for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
pg_isready -h 127.0.0.1 -p 5432
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
fi
echo "services: PostgreSQL $version on 127.0.0.1:5432 (database test), $(java -version 2>&1 | head -1), chromium $(chromium --version 2>/dev/null | awk '{print $2}')"
