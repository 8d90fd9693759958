"""eventpipe consumers: loaders that read Kafka and COPY rows into PostgreSQL."""
