"""Dev stand-ins: what K2 talks to on a machine with no services, never used by a deployment.

- `devstack/`: a real Apache Kafka broker (KRaft, one node) and a Confluent-compatible Schema Registry,
  started as local processes by `k2 devstack up`.
- `simulator/`: simulated exchange trades (with a fault corpus) produced into the exchanges' topics by
  `k2 produce` and `k2 dev`.

Production code reaches Kafka and the registry only through the clients in `k2_resources`, configured
by address, so nothing outside this package knows whether the other end is a stand-in.
"""
