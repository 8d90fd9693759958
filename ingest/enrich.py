"""Server-side enrichment of a validated event into the record that goes to Kafka."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from ingest.models import BehaviorEvent
from ingest.shops import Shop


def behavior_record(event: BehaviorEvent, shop: Shop, received_at: datetime) -> dict[str, Any]:
    """The Kafka record of a behavior event: its fields plus shop_id, event_id, received_at."""
    record = event.model_dump()
    record["event_id"] = event.event_id or uuid.uuid4()
    record["shop_id"] = shop.id
    record["received_at"] = received_at
    if record["timestamp"] is None:
        record["timestamp"] = received_at
    return record
