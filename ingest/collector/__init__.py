"""The HTTP collector: routes, request reading and validation, enrichment,
webhooks, rate limits, delivery and spool, the beacon, OpenAPI, its process."""
