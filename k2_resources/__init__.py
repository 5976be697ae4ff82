"""How K2 talks to the outside: Kafka, the Schema Registry, the Iceberg catalog, and the embedded dev stack."""
