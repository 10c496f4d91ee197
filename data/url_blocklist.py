"""``data.url_blocklist``: a text file of domains whose pages a WARC corpus drops, before any other
filter looks at them (language identification included, which they would only slow down).

The file lists one domain per line (``example.com``); ``#`` starts a comment, blank lines are
ignored, case and a trailing dot do not matter. A page is dropped when its ``WARC-Target-URI``'s
host is a listed domain or a subdomain of one: ``example.com`` blocks ``news.example.com``, not
``notexample.com``. Only WARC files' pages have URLs, so only their units are keyed by the list,
and by its domains, not its bytes: editing a comment or the order re-filters nothing.

The file is read once, by the process that plans the ingest, and its domains travel with each
unit's call, so ``--ray`` workers need no copy of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gptflow.data.errors import UserError
from gptflow.data.hashing import hash_json

URL_BLOCKLIST = "url_blocklist"
"""Its name among the quality filters' counts (``dataset.quality_dropped.url_blocklist``)."""
LISTED_DOMAIN = "listed_domain"
"""The rule a blocked page is counted under, as each datatrove filter names its own."""
_NOT_IN_A_DOMAIN = set("/:@?=* \t")


class UrlBlocklistError(UserError):
    """``data.url_blocklist`` names a file that cannot be read or is not a list of domains."""


@dataclass(frozen=True)
class UrlBlocklist:
    path: str
    domains: frozenset[str]

    @functools.cached_property  # asked for every WARC file's unit key
    def digest(self) -> str:
        """The hash of its domains: what keys a WARC file's unit."""
        return hash_json(sorted(self.domains))

    def blocks(self, url: str | None) -> bool:
        """Whether ``url``'s host is a listed domain or under one (a page without a URL is not blocked)."""
        try:
            host = (urlsplit(url).hostname or "").rstrip(".") if url else ""
        except ValueError:  # a malformed URL (an unclosed IPv6 bracket) has no host to match
            return False
        labels = host.split(".")
        return bool(host) and any(".".join(labels[start:]) in self.domains for start in range(len(labels)))


def load_url_blocklist(path: str | None) -> UrlBlocklist | None:
    """The blocklist at ``path`` (None when unset); a ``UrlBlocklistError`` naming the file and the
    fix when it cannot be read or a line is no domain."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise UrlBlocklistError(f"data.url_blocklist: cannot read {path} ({reason}). Give a UTF-8 text file of "
                                f"domains, one per line, or leave data.url_blocklist unset.") from None
    domains = set()
    for number, line in enumerate(lines, start=1):
        domain = line.partition("#")[0].strip().lower().rstrip(".")
        if domain and (_NOT_IN_A_DOMAIN & set(domain) or domain.startswith(".")):
            raise UrlBlocklistError(f"data.url_blocklist: {path}:{number} is {line.strip()!r}, not a domain. Write "
                                    f"the host alone, such as example.com (it blocks its subdomains too).")
        if domain:
            domains.add(domain)
    return UrlBlocklist(path, frozenset(domains))


def blocklist_for(blocklist: UrlBlocklist | None, source_format: str) -> UrlBlocklist | None:
    """The blocklist that judges a file of ``source_format``: only a WARC file's pages have URLs."""
    return blocklist if source_format == "warc" else None


def blocklist_key_fields(blocklist: UrlBlocklist | None) -> dict[str, Any]:
    """What a file's blocklist (``blocklist_for``) adds to its ingest unit's key: its digest, or
    nothing (unset, or not a WARC file), so that such a unit is never re-ingested for it."""
    return {URL_BLOCKLIST: blocklist.digest} if blocklist is not None else {}
