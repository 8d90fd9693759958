"""Server-side enrichment: ids, receive time, clock-skew correction, device, IP, country."""

from __future__ import annotations

import functools
import ipaddress
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ingest.collector.models import BehaviorEvent, StorefrontEvent
from ingest.core.headers import valid_text
from ingest.core.settings import Settings
from ingest.core.shops import Shop
from ingest.core.streams import BEHAVIOR, CONTEXT, STOREFRONT, Stream

_TABLET = re.compile(r"iPad|Tablet|PlayBook|Silk|Kindle|(Android(?!.*Mobile))", re.I)
_MOBILE = re.compile(r"Mobi|iPhone|iPod|Android|Windows Phone|BlackBerry|Opera Mini", re.I)
_SESSION_FACTS = ("referrer", "language", "screen_resolution")


@functools.lru_cache(maxsize=1024)  # a site's traffic comes from few distinct agents
def device_type(user_agent: str | None) -> str | None:
    """``mobile``, ``tablet`` or ``desktop`` from a User-Agent (None when there is none)."""
    if not user_agent:
        return None
    if _TABLET.search(user_agent):
        return "tablet"
    if _MOBILE.search(user_agent):
        return "mobile"
    return "desktop"


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def client_ip(request: web.Request, settings: Settings) -> str | None:
    """The client's address: the peer, or X-Forwarded-For when the peer is a trusted proxy.

    Truncated to /24 (IPv4) or /48 (IPv6) unless ``keep_full_ip`` is set.
    """
    trusted = _networks(tuple(settings.trusted_proxies))
    address = _parse(request.remote)
    # Every line, in order: a proxy may append its own line instead of extending the
    # client's, and reading the first line only would believe what the client wrote.
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
    if address is not None and forwarded and any(address in n for n in trusted):
        # Walk right to left past our own proxies; the first other hop is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            parsed = _parse(hop)
            if parsed is None:
                break
            address = parsed
            if not any(parsed in n for n in trusted):
                break
    if address is None:
        return None
    return str(address) if settings.keep_full_ip else _truncated(address)


@functools.lru_cache(maxsize=4096)
def _truncated(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: what is stored by default."""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def _parse(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value) if value else None
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone id ("fe80::1%eth0", from a header: any text) names an interface of
        # the sender, no part of the address, and PostgreSQL's inet refuses it.
        return ipaddress.IPv6Address(address.packed)
    return address


@dataclass(frozen=True)
class Received:
    """What the collector knows about one request, shared by its events."""

    at: datetime
    skew: timedelta
    latest: datetime  # the latest event time accepted as it is; later ones become ``at``
    context: dict[str, str | None]
    # The context of a behavior event whose metadata names no session fact:
    # one dict for all of them, never changed.
    behavior_context: dict[str, str | None]

    @classmethod
    def of(
        cls, request: web.Request, settings: Settings, sent_at: datetime | None, at: datetime
    ) -> Received:
        """Build from the request; ``sent_at`` is the client's clock when it sent the batch."""
        agent = request.headers.get("User-Agent")
        # Stored as sent, but as valid UTF-8: an undecodable byte becomes U+FFFD.
        agent = valid_text(agent) if agent else None
        country = request.headers.get(settings.country_header) if settings.country_header else None
        context: dict[str, str | None] = {
            "user_agent": agent[:1024] if agent else None,
            "device_type": device_type(agent),
            "client_ip": client_ip(request, settings),
            "country_code": country.upper()
            if country and len(country) == 2 and country.isascii() and country.isalpha()
            else None,
        }
        skew = timedelta(0)
        if sent_at is not None and abs(at - sent_at) > timedelta(seconds=settings.skew_min_s):
            # Only a clock that is really off is corrected, and by whole minutes:
            # a retry of the same body seconds later must keep the same event
            # time, or (shop, event_id, time) deduplication would store it twice.
            skew = timedelta(minutes=round((at - sent_at) / timedelta(minutes=1)))
        latest = at + timedelta(seconds=settings.max_future_skew_s)
        return cls(at, skew, latest, context, {**context, **dict.fromkeys(_SESSION_FACTS)})

    def event_time(
        self, client_time: datetime | None, assigned: datetime | None = None
    ) -> tuple[datetime, datetime | None]:
        """(time to store, the client's original when it differs).

        The client's clock is corrected by (received - sent), as Snowplow and
        Segment do; a time still too far in the future is clamped to now.
        """
        if client_time is None:
            return assigned or self.at, None
        if client_time.tzinfo is None:
            client_time = client_time.replace(tzinfo=UTC)  # a time without a zone is UTC
        corrected = client_time + self.skew if self.skew else client_time
        if corrected > self.latest:
            corrected = self.at
        return corrected, (None if corrected is client_time else client_time)


class AssignedTimes:
    """Event times the collector gave to client event ids that came without one.

    A client that retries such an event (after a 503 or a timeout) gets the
    same time again, so the retry deduplicates on (shop, event_id, time) even when
    the first attempt reached Kafka after all. Per process and bounded: a
    retry that lands on another collector process may still be stored twice.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._times: OrderedDict[tuple[uuid.UUID, uuid.UUID], datetime] = OrderedDict()

    def time_for(self, shop: Shop, event_id: uuid.UUID | None, now: datetime) -> datetime | None:
        """The time given to this event before, else remember ``now`` for it."""
        if event_id is None:
            return None
        key = (shop.id, event_id)
        known = self._times.get(key)
        if known is not None:
            return known
        self._times[key] = now
        if len(self._times) > self.capacity:
            self._times.popitem(last=False)
        return None


def _record(
    event: BehaviorEvent | StorefrontEvent,
    shop: Shop,
    received: Received,
    assigned: datetime | None,
    stream: Stream,
) -> dict[str, Any]:
    """Fields plus server facts; a corrected or clamped time keeps the client's in the
    stream's ``extra_column``."""
    # A shallow copy of the validated fields: model_dump() would rebuild every
    # nested dict and costs more than the rest of the event's path together.
    # Nested values are shared with the model and never mutated here.
    record = vars(event).copy()
    record["event_id"] = event.event_id or uuid.uuid4()
    record["shop_id"] = shop.id
    record["received_at"] = received.at
    time_field, extra_field = stream.time_column, stream.extra_column
    record[time_field], original = received.event_time(record[time_field], assigned)
    if original is not None:
        record[extra_field] = {
            **record[extra_field],
            stream.original_time_key: original.isoformat(),
        }
    return record


def behavior_record(
    event: BehaviorEvent, shop: Shop, received: Received, assigned: datetime | None = None
) -> dict[str, Any]:
    """The Kafka record of a behavior event: its fields, server facts, and session context."""
    record = _record(event, shop, received, assigned, BEHAVIOR)
    metadata = event.metadata
    if metadata and any(fact in metadata for fact in _SESSION_FACTS):
        context = dict(received.context)
        for fact in _SESSION_FACTS:
            value = metadata.get(fact)
            context[fact] = value[:1024] if isinstance(value, str) else None
        record[CONTEXT] = context
    else:
        record[CONTEXT] = received.behavior_context
    return record


def storefront_record(
    event: StorefrontEvent, shop: Shop, received: Received, assigned: datetime | None = None
) -> dict[str, Any]:
    """The Kafka record of a storefront event."""
    record = _record(event, shop, received, assigned, STOREFRONT)
    record[CONTEXT] = received.context
    return record
