"""What every program shares; imports nothing else of the project.

Settings, errors, logs, the service lifecycle, database access and named
queries, migrations, metrics, the Kafka producer and topics, the record
contract, the small HTTP server, process spawning and supervision.
"""
