"""The collector's models (``ingest.collector.models``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from ingest.collector.models import BehaviorEvent, StorefrontEvent, trusted


def _same(made: Any, validated: Any) -> None:
    assert type(made) is type(validated)
    assert made == validated
    assert list(vars(made)) == list(vars(validated))  # every field, in the model's order
    assert made.model_fields_set == validated.model_fields_set
    assert made.__pydantic_extra__ == validated.__pydantic_extra__
    assert made.__pydantic_private__ == validated.__pydantic_private__
    assert made.model_dump_json() == validated.model_dump_json()


def test_trusted_is_what_model_validate_makes_of_the_same_values() -> None:
    """The tracker protocols' fast paths build their models with ``trusted``; a pydantic
    release that holds a model's state otherwise fails here first."""
    given = {
        "event_id": uuid.uuid4(),
        "event_type": "click",
        "session_id": "s1",
        "page_url": "https://shop.example/",
        "timestamp": datetime(2026, 12, 1, tzinfo=UTC),
        "event_data": {"href": "/x"},
        "metadata": {"app_id": "a"},
    }
    validated = BehaviorEvent.model_validate(given)
    _same(trusted(BehaviorEvent, dict(vars(validated)), frozenset(given)), validated)
    sent = {"event_type": "$identify", "anon_id": "a", "session_id": "s", "user_id": "u"}
    shop_event = StorefrontEvent.model_validate(sent)
    _same(trusted(StorefrontEvent, dict(vars(shop_event)), frozenset(sent)), shop_event)
