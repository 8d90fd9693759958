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

import ahocorasick_rs
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

# Only the start of an agent is screened: real ones are far shorter, and a client that
# pads its agent to hide a token could as well leave the token out.
SCREENED_CHARS = 512

# Removed from an agent before the match: browser tokens that contain a crawler word
# ("...Bot..." in an app name, say), as crawlerdetect does, and the libraries' own
# tokens (``node-fetch/1.0`` also matches the list's ``Fetch/[0-9]``).
_EXCLUDED = re.compile(
    "|".join(f"(?:{p})" for p in (*_EXCLUSIONS, *sorted(HTTP_LIBRARIES))), re.IGNORECASE
)
# An agent opening with a library's token is that library's, whatever its comment says
# (node-fetch 2 sends "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", and the
# list takes "github.com" for a crawler's contact URL).
HTTP_LIBRARY_TOKEN = re.compile("|".join(f"(?:{p})" for p in sorted(HTTP_LIBRARIES)), re.IGNORECASE)

_META = re.compile(r"(?<!\\)[\^$.*+?()\[\]{}|]")
# crawlerdetect's catch-all: a word of [a-z0-9_-] ending in one of these words. It
# matches exactly where one of the words occurs: searched as those words.
_CATCH_ALL = re.compile(r"^\[a-z0-9\\-_\]\*\(([a-z|]+)\)$")


def _prefix(pattern: str) -> str:
    """The text (lower-case) every match of ``pattern`` starts with; '' when none is
    certain (a class, a group or an anchor first, or an alternation in it)."""
    if "|" in pattern:
        return ""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            out.append(pattern[i + 1])  # an escaped punctuation mark: itself
            i += 2
            continue
        if char == "\\" or char in "^$.*+?()[]{}|":
            if char in "?*{" and out:
                out.pop()  # the quantifier makes the previous character optional
            break
        out.append(char)
        i += 1
    return "".join(out).lower()


class _Screen:
    """crawlerdetect's list as one Aho-Corasick automaton (ahocorasick-rs): its
    literal entries, the catch-all's words and the fixed start of every other entry,
    each such start confirmed by its own regex. Python's re tries each of ~1,400
    alternatives at every position of an agent (20 ms for 1 KB of noise); this is
    linear in the agent (tens of microseconds)."""

    def __init__(self, entries: list[str]) -> None:
        checks: dict[str, list[re.Pattern[str] | None]] = {}
        anchored: list[str] = []
        anywhere: list[str] = []
        for entry in entries:
            words = _CATCH_ALL.match(entry)
            if words:
                for word in words.group(1).split("|"):
                    checks.setdefault(word, []).append(None)
            elif not _META.search(entry):
                checks.setdefault(re.sub(r"\\(.)", r"\1", entry).lower(), []).append(None)
            elif entry.startswith("^"):
                anchored.append(entry)
            elif prefix := _prefix(entry):
                checks.setdefault(prefix, []).append(re.compile(entry, re.IGNORECASE))
            else:
                anywhere.append(entry)
        self._texts = list(checks)
        self._checks = [checks[text] for text in self._texts]
        self._automaton = ahocorasick_rs.AhoCorasick(self._texts)
        self._anchored = re.compile("|".join(f"(?:{p})" for p in anchored), re.IGNORECASE)
        self._anywhere = (
            re.compile("|".join(f"(?:{p})" for p in anywhere), re.IGNORECASE) if anywhere else None
        )

    def search(self, agent: str) -> str | None:
        """The first entry's text ``agent`` matches, or None."""
        found = self._anchored.match(agent)
        if found:
            return found.group(0)
        lowered = agent.lower()
        for index, start, end in self._automaton.find_matches_as_indexes(lowered, overlapping=True):
            for check in self._checks[index]:
                if check is None:
                    return agent[start:end] if len(lowered) == len(agent) else lowered[start:end]
                confirmed = check.match(lowered, start)
                if confirmed:
                    return confirmed.group(0)
        found = self._anywhere.search(agent) if self._anywhere else None
        return found.group(0) if found else None


_SCREEN = _Screen([p for p in _CRAWLERS if p not in HTTP_LIBRARIES])

# The reasons a request is taken for a bot (the metric's label values).
CRAWLER = "crawler"
DENY_LIST = "deny_list"
REASONS = (CRAWLER, DENY_LIST)


@functools.lru_cache(maxsize=8192)  # a site's traffic comes from few distinct agents
def crawler(user_agent: str) -> str | None:
    """The crawler token ``user_agent`` matches (``Googlebot``, ``HeadlessChrome``...),
    or None for a browser, an HTTP library or no agent at all."""
    agent = user_agent[:SCREENED_CHARS].strip()
    if not agent or HTTP_LIBRARY_TOKEN.match(agent) or _SCREEN.search(agent) is None:
        return None  # no entry matches: none would once browser tokens are removed
    # Something matches: crawlerdetect's way, which removes browser (and library)
    # tokens first, so that a word inside one of them is no bot.
    agent = _EXCLUDED.sub("", agent).strip()
    return _SCREEN.search(agent) if agent else None


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
