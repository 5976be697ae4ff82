# Apache Iceberg's REST catalog server with a JDBC catalog on PostgreSQL. The upstream image ships only
# the SQLite driver, so the PostgreSQL JDBC driver is added to its classpath.
FROM apache/iceberg-rest-fixture:1.9.2

ARG POSTGRESQL_JDBC_VERSION=42.7.5
USER root
ADD --chown=iceberg:iceberg \
    https://repo1.maven.org/maven2/org/postgresql/postgresql/${POSTGRESQL_JDBC_VERSION}/postgresql-${POSTGRESQL_JDBC_VERSION}.jar \
    /usr/lib/iceberg-rest/postgresql.jar
USER iceberg:iceberg
CMD ["java", "-cp", "iceberg-rest-adapter.jar:postgresql.jar", "org.apache.iceberg.rest.RESTCatalogServer"]
