"""Live exchange feeds: WebSocket -> Kafka, as long-running jobs kept alive by sensors."""
