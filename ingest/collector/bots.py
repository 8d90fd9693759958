"""Which requests come from bots: crawlers, headless browsers and monitors.

The list is crawlerdetect's (PyPI; kept current by its releases), less the HTTP
libraries and command-line tools it also names (``HTTP_LIBRARIES``): a server-side
SDK (segment-analytics-python, snowplow-tracker and posthog-python send as
python-requests or their own agent), ``curl`` and scripts send events on purpose,
and the ``curl`` that ``eventpipe up`` prints must land. What stays is what runs
pages: search and ad crawlers that execute JavaScript, headless automation
(HeadlessChrome, PhantomJS, Lighthouse) and uptime monitors. A shop adds its own
case-insensitive substrings (``bot_deny_list`` in ``shops.settings``).
"""

from __future__ import annotations

import functools
import re

from crawlerdetect.providers.crawlers import data as _CRAWLERS
from crawlerdetect.providers.exclusions import data as _EXCLUSIONS

# crawlerdetect's entries (exactly as it spells them) naming a general-purpose HTTP
# client or a command-line tool rather than a bot. tests/ingest/collector/test_bots.py
# checks that each is still in the list (a release renaming one would otherwise flag
# that library again) and that the SDKs' real user agents are not bots.
HTTP_LIBRARIES = frozenset(
    {
        r"^Dart\/[0-9]",
        r"^HTTPClient\/",
        r"^Java\/",
        r"^PHP\/",
        r"^Ruby|Ruby\/[0-9]",
        r"aiohttp\/",
        r"amphp\/http-client",
        r"Apache-HttpClient",
        r"axios\/",
        r"Commons-HttpClient",
        r"cpp-httplib",
        r"curl",
        r"Faraday v",
        r"Go-http-client",
        r"Google-HTTP-Java-Client",
        r"GRequests",
        r"GuzzleHttp",
        r"http-kit",
        r"HTTPie",
        r"libwww",
        r"lwp-request",
        r"lwp-trivial",
        r"LWP::Simple",
        r"node-fetch",
        r"node-superagent",
        r"node-urllib",
        r"okhttp",
        r"php-requests",
        r"PostmanRuntime",
        r"Python-httplib2",
        r"python-httpx",
        r"python-requests",
        r"Python-urllib",
        r"quic-go-HTTP\/",
        r"ReactorNetty",
        r"reqwest\/",
        r"RestSharp",
        r"Typhoeus",
        r"undici",
        r"unirest-java",
        r"wget",
        r"WinHTTP\/",
        r"Zend_Http_Client",
    }
)

# One alternation, as crawlerdetect builds its own, without the libraries above.
_PATTERN = re.compile(
    "|".join(f"(?:{p})" for p in _CRAWLERS if p not in HTTP_LIBRARIES), re.IGNORECASE
)
# Removed from an agent before the match: browser tokens that contain a crawler word
# ("...Bot..." in an app name, say), as crawlerdetect does, and the libraries' own
# tokens (``node-fetch/1.0`` also matches the list's ``Fetch/[0-9]``).
_EXCLUDED = re.compile(
    "|".join(f"(?:{p})" for p in (*_EXCLUSIONS, *sorted(HTTP_LIBRARIES))), re.IGNORECASE
)

# The reasons a request is taken for a bot (the metric's label values).
CRAWLER = "crawler"
DENY_LIST = "deny_list"
REASONS = (CRAWLER, DENY_LIST)


# An agent opening with a library's token is that library's, whatever its comment says
# (node-fetch 2 sends "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", and the
# list takes "github.com" for a crawler's contact URL).
_LIBRARY_FIRST = re.compile("|".join(f"(?:{p})" for p in sorted(HTTP_LIBRARIES)), re.IGNORECASE)


@functools.lru_cache(maxsize=8192)  # a site's traffic comes from few distinct agents
def crawler(user_agent: str) -> str | None:
    """The crawler token ``user_agent`` matches (``Googlebot``, ``HeadlessChrome``...),
    or None for a browser, an HTTP library or no agent at all."""
    if _LIBRARY_FIRST.match(user_agent.lstrip()):
        return None
    agent = _EXCLUDED.sub("", user_agent).strip()
    if not agent:
        return None
    found = _PATTERN.search(agent)
    return found.group(0) if found else None


@functools.lru_cache(maxsize=8192)
def reason(user_agent: str | None, deny_list: tuple[str, ...] = ()) -> str | None:
    """Why ``user_agent`` is a bot (``CRAWLER`` or ``DENY_LIST``: a shop's own
    substrings, lower-case), or None when it is not."""
    if not user_agent:
        return None
    if crawler(user_agent) is not None:
        return CRAWLER
    if deny_list:
        lowered = user_agent.lower()
        if any(entry in lowered for entry in deny_list):
            return DENY_LIST
    return None
