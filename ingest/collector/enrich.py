"""Server-side enrichment: ids, receive time, clock-skew correction, device, IP, country,
and what a shop's privacy settings keep of them (IP policy, anonymous requests, bot flags)."""

from __future__ import annotations

import functools
import ipaddress
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import maxminddb
from aiohttp import web

from ingest.collector import bots
from ingest.collector.models import BehaviorEvent, EventFields, StorefrontEvent
from ingest.core.errors import ConfigError
from ingest.core.headers import valid_text
from ingest.core.settings import Settings
from ingest.core.shops import Shop
from ingest.core.streams import BEHAVIOR, CONTEXT, STOREFRONT, Stream

_TABLET = re.compile(r"iPad|Tablet|PlayBook|Silk|Kindle|(Android(?!.*Mobile))", re.I)
_MOBILE = re.compile(r"Mobi|iPhone|iPod|Android|Windows Phone|BlackBerry|Opera Mini", re.I)
# What a behavior event's metadata may tell of its session, copied into its context.
SESSION_FACTS = ("referrer", "language", "screen_resolution")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Jitsu's X-IP-Policy values asking for no IP at all (its "keep" and "comfort" keep some).
_ANONYMOUS_IP_POLICIES = frozenset({"strict", "remove"})


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
    """The client's address as ``settings``' default IP policy keeps it (see
    ``client_address``): whole, truncated to /24 (IPv4) or /48 (IPv6), or None."""
    return kept_ip(client_address(request, settings), settings.default_ip_policy)


def client_address(request: web.Request, settings: Settings) -> IPAddress | None:
    """The client's whole address: the peer, or X-Forwarded-For when the peer is a
    trusted proxy. What the rate limit counts and the country is looked up from; what
    a record keeps of it is ``kept_ip``'s."""
    trusted = _networks(tuple(settings.trusted_proxies))
    address = _parse(request.remote)
    if address is None or not any(address in n for n in trusted):
        return address  # the header is not even read: anyone may write it
    # Every line, in order: a proxy may append its own line instead of extending the
    # client's, and reading the first line only would believe what the client wrote.
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
    # Walk right to left past our own proxies; the first other hop is the client.
    for hop in reversed([h.strip() for h in forwarded.split(",")] if forwarded else []):
        parsed = _parse(hop)
        if parsed is None:
            break
        address = parsed
        if not any(parsed in n for n in trusted):
            break
    return address


def kept_ip(address: IPAddress | None, policy: str) -> str | None:
    """What an IP policy keeps of ``address``: ``keep`` all of it, ``truncate`` its
    /24 (IPv4) or /48 (IPv6) network, ``remove`` nothing."""
    if address is None or policy == "remove":
        return None
    return str(address) if policy == "keep" else _truncated(address)


@functools.lru_cache(maxsize=4096)
def _truncated(address: IPAddress) -> str:
    """The /24 (IPv4) or /48 (IPv6) network of an address: what is stored by default."""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def _parse(value: str | None) -> IPAddress | None:
    if not value:
        return None
    # A client sends many requests from one address: parsing it (ipaddress, in Python)
    # was a tenth of a beacon's enrichment. Only texts as short as an address are
    # cached, so header text a client varies cannot fill the cache with kilobytes.
    return _parsed(value) if len(value) <= _ADDRESS_TEXT else _parse_text(value)


_ADDRESS_TEXT = 64  # an IPv6 address with a zone id is ~45 characters


def _parse_text(value: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        # A zone id ("fe80::1%eth0", from a header: any text) names an interface of
        # the sender, no part of the address, and PostgreSQL's inet refuses it.
        return ipaddress.IPv6Address(address.packed)
    return address


_parsed = functools.lru_cache(maxsize=4096)(_parse_text)


def user_agent(request: web.Request) -> str | None:
    """The request's User-Agent as stored: valid UTF-8 (an undecodable byte becomes
    U+FFFD), at most 1024 characters; None when there is none."""
    agent = request.headers.get("User-Agent")
    return valid_text(agent)[:1024] if agent else None


def anonymous(request: web.Request) -> bool:
    """Whether the request asks to be collected anonymously: Snowplow's ``SP-Anonymous``
    header (any value, as its collector reads it), Jitsu's ``X-IP-Policy: strict`` or
    ``remove``, or the query's ``anonymous=1`` (the beacon's: ``sendBeacon`` can set no
    header). Its records then keep no IP, no country, and no session facts (referrer,
    language, screen resolution: neither in the record's context nor in a behavior
    event's metadata); user agent and device type stay (bot screening and device
    counts need them, and they are what any request carries)."""
    headers = request.headers
    if "SP-Anonymous" in headers:
        return True
    policy = headers.get("X-IP-Policy")
    if policy and policy.strip().lower() in _ANONYMOUS_IP_POLICIES:
        return True
    return request.query.get("anonymous") == "1"


@functools.lru_cache(maxsize=4)
def geoip_reader(path: Path) -> maxminddb.Reader:
    """The MaxMind-format database at ``path``, opened once per process (memory-mapped
    by the C reader when there is one); ConfigError when it cannot be read."""
    try:
        return maxminddb.open_database(str(path))
    except (OSError, ValueError) as exc:  # InvalidDatabaseError is a RuntimeError
        raise ConfigError(
            f"geoip_db {path} cannot be read: {exc}",
            hint="set EVENTPIPE_GEOIP_DB to a MaxMind-format (.mmdb) country or city database",
        ) from exc
    except RuntimeError as exc:
        raise ConfigError(
            f"geoip_db {path} is not a MaxMind database: {exc}",
            hint="set EVENTPIPE_GEOIP_DB to a MaxMind-format (.mmdb) country or city database",
        ) from exc


@functools.lru_cache(maxsize=16_384)
def country_of(path: Path, address: IPAddress) -> str | None:
    """The ISO country code of ``address`` in the database at ``path`` (its ``country``,
    else its ``registered_country``, as GeoIP2/GeoLite2 Country and City hold them)."""
    try:
        found = geoip_reader(path).get(address)
    except ValueError:  # an IPv6 address in an IPv4-only database
        return None
    if not isinstance(found, dict):
        return None
    for key in ("country", "registered_country"):
        place = found.get(key)
        code = place.get("iso_code") if isinstance(place, dict) else None
        if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
            return code.upper()
    return None


def _country(request: web.Request, settings: Settings, address: IPAddress | None) -> str | None:
    """The client's country: from ``geoip_db`` by its whole address (never a truncated
    one), else from ``country_header``."""
    if settings.geoip_db is not None and address is not None:
        found = country_of(settings.geoip_db, address)
        if found is not None:
            return found
    country = request.headers.get(settings.country_header) if settings.country_header else None
    if country and len(country) == 2 and country.isascii() and country.isalpha():
        return country.upper()
    return None


@functools.lru_cache(maxsize=4096)  # a client's requests share these: made once for them
def _contexts(
    agent: str | None, address: IPAddress | None, ip_policy: str, country: str | None
) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """A request's record context and a behavior event's (its session facts None): shared
    by every record of the requests they are the same for, so never changed in place
    (whoever adds to one copies it first)."""
    context: dict[str, str | None] = {
        "user_agent": agent,
        "device_type": device_type(agent),
        "client_ip": kept_ip(address, ip_policy),
        "country_code": country,
    }
    return context, {**context, **dict.fromkeys(SESSION_FACTS)}


@dataclass(frozen=True)
class ShopView:
    """What a request's records keep for one shop, by its settings (``Received.of_shop``)."""

    context: dict[str, str | None]
    # The context of a behavior event whose metadata names no session fact (and of
    # every behavior event of an anonymous request): one dict for all, never changed.
    behavior_context: dict[str, str | None]
    bot: bool  # the shop flags bots and this is one: metadata.bot / props.bot true
    anonymous: bool

    def with_facts(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The context of a behavior record whose ``metadata`` names session facts: the
        shop's, with each fact as text of at most 1024 characters, else null (every
        route's record holds them alike: the fast paths call this too)."""
        context: dict[str, Any] = dict(self.context)
        for fact in SESSION_FACTS:
            value = metadata.get(fact)
            context[fact] = value[:1024] if isinstance(value, str) else None
        return context


@dataclass(frozen=True)
class Received:
    """What the collector knows about one request, shared by its events."""

    at: datetime
    skew: timedelta
    latest: datetime  # the latest event time accepted as it is; later ones become ``at``
    # The context by the collector's defaults (a shop's settings: ``of_shop``).
    context: dict[str, str | None]
    behavior_context: dict[str, str | None]
    address: IPAddress | None = None  # whole: the shop's IP policy decides what is kept
    anonymous: bool = False
    agent: str | None = None  # the User-Agent screened for bots (None: not screened)
    ip_policy: str = "truncate"  # the defaults of shops whose settings name none
    bot_policy: str = "drop"
    _shops: dict[UUID, ShopView] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        request: web.Request,
        settings: Settings,
        sent_at: datetime | None,
        at: datetime,
        *,
        screen_bots: bool = True,
    ) -> Received:
        """Build from the request; ``sent_at`` is the client's clock when it sent the batch.
        ``screen_bots`` False: its records are never flagged as a bot's (Shopify's webhooks)."""
        agent = user_agent(request)
        address = client_address(request, settings)
        hidden = anonymous(request)
        country = None if hidden else _country(request, settings, address)
        context, behavior_context = _contexts(
            agent, None if hidden else address, settings.default_ip_policy, country
        )
        skew = timedelta(0)
        if sent_at is not None and abs(at - sent_at) > timedelta(seconds=settings.skew_min_s):
            # Only a clock that is really off is corrected, and by whole minutes:
            # a retry of the same body seconds later must keep the same event
            # time, or (shop, event_id, time) deduplication would store it twice.
            skew = timedelta(minutes=round((at - sent_at) / timedelta(minutes=1)))
        latest = at + timedelta(seconds=settings.max_future_skew_s)
        return cls(
            at,
            skew,
            latest,
            context,
            behavior_context,
            address,
            hidden,
            agent if screen_bots else None,
            settings.default_ip_policy,
            settings.bot_policy,
        )

    def of_shop(self, shop: Shop) -> ShopView:
        """What this request's records keep for ``shop`` (its IP and bot policies),
        worked out once per shop."""
        view = self._shops.get(shop.id)
        if view is not None:
            return view
        settings = shop.privacy
        context, behavior_context = self.context, self.behavior_context
        policy = settings.ip_policy or self.ip_policy
        if policy != self.ip_policy and not self.anonymous:
            context, behavior_context = _contexts(
                context["user_agent"], self.address, policy, context["country_code"]
            )
        bot = (settings.bot_policy or self.bot_policy) == "flag" and (
            bots.reason(self.agent, settings.bot_deny_list) is not None
        )
        view = ShopView(context, behavior_context, bot, self.anonymous)
        self._shops[shop.id] = view
        return view

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
    record: dict[str, Any],
    shop: Shop,
    received: Received,
    assigned: datetime | None,
    stream: Stream,
    view: ShopView,
) -> dict[str, Any]:
    """An event's fields (a dict of the caller's own, completed in place) plus server
    facts; a corrected or clamped time keeps the client's in the stream's
    ``extra_column``."""
    record["event_id"] = record["event_id"] or uuid.uuid4()
    record["shop_id"] = shop.id
    record["received_at"] = received.at
    time_field, extra_field = stream.time_column, stream.extra_column
    record[time_field], original = received.event_time(record[time_field], assigned)
    if original is not None:
        record[extra_field] = {
            **record[extra_field],
            stream.original_time_key: original.isoformat(),
        }
    if view.bot:
        record[extra_field] = {**(record[extra_field] or {}), "bot": True}
    return record


def behavior_record(
    event: BehaviorEvent, shop: Shop, received: Received, assigned: datetime | None = None
) -> dict[str, Any]:
    """The Kafka record of a behavior event: its fields, server facts, and session context."""
    return behavior_fields_record(_fields(event), shop, received, assigned)


def behavior_fields_record(
    fields: EventFields,
    shop: Shop,
    received: Received,
    assigned: datetime | None = None,
    view: ShopView | None = None,
) -> dict[str, Any]:
    """The Kafka record of a behavior event given as the fields of a ``BehaviorEvent``
    (``models.EventFields``: the dict becomes the record). ``view``: ``received``'s
    ``of_shop(shop)``, when the caller has it (a batch's events share it)."""
    if view is None:
        view = received.of_shop(shop)
    metadata = fields["metadata"]  # the client's, before _record adds server keys
    record = _record(fields, shop, received, assigned, BEHAVIOR, view)
    if metadata and not metadata.keys().isdisjoint(SESSION_FACTS):  # one C call
        if view.anonymous:  # no session fact kept, in the context or the metadata
            record["metadata"] = {
                k: v for k, v in record["metadata"].items() if k not in SESSION_FACTS
            }
            record[CONTEXT] = view.behavior_context
            return record
        record[CONTEXT] = view.with_facts(metadata)
    else:
        record[CONTEXT] = view.behavior_context
    return record


def storefront_record(
    event: StorefrontEvent, shop: Shop, received: Received, assigned: datetime | None = None
) -> dict[str, Any]:
    """The Kafka record of a storefront event."""
    return storefront_fields_record(_fields(event), shop, received, assigned)


def _fields(event: BehaviorEvent | StorefrontEvent) -> dict[str, Any]:
    # A shallow copy of the validated fields: model_dump() would rebuild every
    # nested dict and costs more than the rest of the event's path together.
    # Nested values are shared with the model and never mutated here.
    return vars(event).copy()


def storefront_fields_record(
    fields: EventFields,
    shop: Shop,
    received: Received,
    assigned: datetime | None = None,
    view: ShopView | None = None,
) -> dict[str, Any]:
    """The Kafka record of a storefront event given as the fields of a
    ``StorefrontEvent`` (``models.EventFields``: the dict becomes the record): how a
    tracker protocol that has checked its message skips building the model only to
    copy its fields out again. ``view`` as for ``behavior_fields_record``."""
    if view is None:
        view = received.of_shop(shop)
    record = _record(fields, shop, received, assigned, STOREFRONT, view)
    record[CONTEXT] = view.context
    country = view.context.get("country_code")
    sdk = record["props"].get("$context") if country else None
    if isinstance(sdk, dict) and "geo" not in sdk:
        # An SDK's own context (the Segment API's, kept in props.$context): the country
        # as Jitsu's collector adds it, context.geo.country.code, for analyses of events.
        record["props"] = {
            **record["props"],
            "$context": {**sdk, "geo": {"country": {"code": country}}},
        }
    return record
