"""Request header values made safe to use, whatever bytes a client sent.

aiohttp decodes header bytes as UTF-8 with ``surrogateescape``: a byte that is
not UTF-8 arrives as a lone surrogate (U+DC80..U+DCFF), which asyncpg, orjson,
``hmac.compare_digest`` and every UTF-8 encoder refuse. So a header value is
either checked to be printable ASCII before it is used as an identifier (a
write key, a shop domain, a signature, a webhook id), or turned into valid
UTF-8 text before it is stored or echoed.
"""

from __future__ import annotations


def is_printable_ascii(value: str) -> bool:
    """True when ``value`` holds only printable ASCII (space to ``~``)."""
    return value.isascii() and value.isprintable()


def printable_ascii(value: str | None) -> str | None:
    """``value`` when it is non-empty printable ASCII, else None.

    Write keys, shop domains, Shopify topics and webhook ids are all ASCII
    tokens: anything else cannot be one, so it is never looked up or stored.
    """
    return value if value and is_printable_ascii(value) else None


def valid_text(value: str) -> str:
    """``value`` as valid UTF-8 text: undecodable bytes become U+FFFD.

    The bytes aiohttp escaped are recovered first, so a valid UTF-8 sequence
    is kept as the character it encodes and only what is not UTF-8 is replaced.
    """
    if value.isascii():  # the common case, and always valid
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = value.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")
