"""Personal data and secrets redacted from documents before anything is trained on them
(``data.redact_pii``): e-mail addresses, phone numbers, IP addresses, payment card numbers and
secrets (cloud and API keys, private key blocks) become ``<EMAIL>``, ``<PHONE>``, ... in place,
so the text keeps its shape. ``redact_path`` does the same to a file's path, for what gptflow
writes and logs about its sources.

Secrets are found two ways: by a vendor's prefix (``AKIA``, ``ghp_``, ...), and by their context
whatever their vendor: the value assigned to a name that ends in ``secret``, ``token``,
``password``, ``api_key``, ``access_key``, ... (``AWS_SECRET_ACCESS_KEY = "..."``, ``export
TOKEN=...``, ``"SecretAccessKey": "..."``, ``password: ...``), and a 40-character AWS secret
access key within 200 characters after a mention of AWS, a secret or an access key id (a
credentials CSV, ``aws configure set``). An assigned value counts when it is a literal that mixes
kinds of characters; code (``token = self.next()``, ``password = password_mgr``), variables
(``$TOKEN``) and plain words (``token_type = "bearer"``) stay.

Speed (``bench/redact.py``): Python's regular expressions scan fast for a literal and slowly for
a class of characters or a lookbehind. So every rule starts from a literal: a secret from its
prefix (and only in documents holding that prefix), an e-mail address from its ``@`` (read
outward from there), a private key from ``-----BEGIN``; and the numeric kinds (phone, card, IP)
share one scan for runs of digits and separators, each run then read by the three rules (with a
character of context either side), most runs (a plain number) dismissed by a test first.

Precision comes before recall: a number that merely looks like a phone or card number is left
alone unless it has the shape of one (separators where a phone number has them; a card number's
issuer prefix, length and Luhn checksum), and a dotted quad that starts with two single digits
(a version, ``2.7.18.1``) or follows a letter or a dot is not taken for an IP address, which also
leaves ``8.8.4.4``-style public resolvers alone. Misses, by design: names and postal addresses (no
shape to find), IPv6 addresses, phone numbers with neither separators nor a leading ``+``, card
numbers of networks other than Visa, Mastercard, American Express and Discover, and secrets with
neither a known prefix nor a name that says what they are (a bare key on a line of its own), or
whose value is a plain word or holds spaces.

Ingest redacts each document as it is read, before it is cut, hashed and split
(``data.ingest``), so dedup, the split and every later stage see the text as it is trained on;
``redact_pii`` is in the raw unit's key, and each unit counts its replacements per kind
(``CorpusUnit.redactions``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath

from gptflow.data.sources import COMPRESSION_BY_SUFFIX, FORMAT_BY_SUFFIX

REDACTION_KINDS = ("private_key", "secret", "email", "credit_card", "phone", "ip_address")
REPLACEMENTS = {kind: f"<{kind.upper()}>" for kind in REDACTION_KINDS}
_FILE_EXTENSIONS = set(FORMAT_BY_SUFFIX) | set(COMPRESSION_BY_SUFFIX)
"""Kept out of a file name's redaction: ``a@b.com.txt``'s ``.txt`` would read as its domain's end."""

_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
                          r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", re.DOTALL)
_SECRET_PREFIXES = ("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xoxa-", "xoxb-",
                    "xoxp-", "xoxo-", "xoxs-", "xoxr-", "AIza", "sk-", "sk_live_")
_SECRET = re.compile(
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{32,}"  # OpenAI-style secret keys
    r"|sk_live_[0-9A-Za-z]{24,}"  # Stripe live keys
)
_SECRET_NAME_WORDS = ("secret", "token", "passw", "pwd", "key")
"""The words that end a name a secret is assigned to (``passw`` as ``password`` or ``passwd``;
``secret`` may go on with ``_key`` or ``_access_key``): found with ``str.find`` in the lower-cased
text, one pass each, many times faster than a regular expression's scan."""
_KEY_QUALIFIERS = tuple(word + separator for word in ("api", "access", "private", "auth")
                        for separator in ("", "_", "-"))
"""What comes before ``key`` in a secret's name: ``api_key``, ``AccessKey``, ``private-key``."""
_SECRET_NAME_ANY_CASE = re.compile(r"secret|token|passw(?:or)?d|pwd|(?:api|access|private|auth)[_-]?key", re.IGNORECASE)
_SECRET_ASSIGNED = re.compile(
    r"(?i:[_-]?(?:access[_-]?)?key)?(?![\w-])[\"']?[ \t]*(?:=>|:=|=(?!=)|:)[ \t]*"  # the name's end, = : := =>
    r"(?:(?P<quote>[\"'`])(?P<quoted>[^\s\"'`]{8,512})(?P=quote)"  # a quoted literal, whole
    r"|(?P<bare>[^\s\"'`,;(){}\[\]<>]{8,512})(?=[\s,;]|$))")  # or a bare value (env, INI, YAML), ending there
"""What follows a secret's name: its value, assigned as in Python, shell, INI, YAML, JSON or Ruby."""
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_AWS_CONTEXT = ("aws", "secret")
"""What an AWS secret access key follows (in lower case): a mention of AWS or a secret; an access
key id, redacted before as ``<SECRET>``, is one too."""
_AWS_CONTEXT_CHARS = 200
"""How far after such a mention an AWS secret access key may start."""
_AWS_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_EMAIL_AT = re.compile(r"@[A-Za-z0-9]")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                           r"[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_EMAIL_LOCAL_MAX = 64

_NUMBERISH = re.compile(r"[0-9+(][0-9 .()+-]{6,}[0-9]")
"""Runs that could hold a phone, card or IP: a digit, ``+`` or ``(``, then digits and separators."""
_CARD = re.compile(r"(?<![\w.-])[0-9]{4}(?:[ -]?[0-9]{4}){2}(?:[ -]?[0-9]{1,4}){1,2}(?![\w-]|\.[0-9])")
_CARD_NETWORKS = (
    (re.compile(r"4"), (13, 16, 19)),  # Visa
    (re.compile(r"5[1-5]|2(?:2[2-9][0-9]|[3-6][0-9]{2}|7[01][0-9]|720)"), (16,)),  # Mastercard
    (re.compile(r"3[47]"), (15,)),  # American Express
    (re.compile(r"6(?:011|5)"), (16, 17, 18, 19)),  # Discover
)
"""Each network's number prefixes and lengths: a number of another length is no card of it."""
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+[0-9]{1,3}(?:[ .-][0-9]{2,8}){1,5}"  # international: +CC then groups, separated
    r"|(?:\([0-9]{3}\) ?|[0-9]{3}[.-])[0-9]{3}[.-][0-9]{4}"  # North American: (555) 123-4567, 555-123-4567
    r")(?![\w]|[.-][0-9])")
_IP = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w]|\.[0-9])")


def redact(text: str) -> tuple[str, Counter[str]]:
    """``text`` with each kind's matches replaced by its ``REPLACEMENTS`` token, and how many of
    each kind were replaced. Kinds apply in ``REDACTION_KINDS`` order: a private key block holds
    base64 the other rules could match, and a card's digits could read as a phone number."""
    counts: Counter[str] = Counter()
    if "-----BEGIN" in text:
        text, counts["private_key"] = _PRIVATE_KEY.subn(REPLACEMENTS["private_key"], text)
    if any(prefix in text for prefix in _SECRET_PREFIXES):
        text = _SECRET.sub(lambda match: _whole_word(match, "secret", counts), text)
    text = _redact_secrets_in_context(text, counts)
    if "@" in text:
        text = _redact_emails(text, counts)
    text = _redact_numbers(text, counts)
    return text, +counts  # without the kinds of count 0


def redact_path(path: str) -> str:
    """``path`` (a file's path or an object's URL) with the personal data and secrets in its folder
    and file names replaced, each name read on its own and the extensions of the formats gptflow
    reads kept: ``/mail/jane.doe@example.com.jsonl.gz`` → ``/mail/<EMAIL>.jsonl.gz`` (another
    extension could be the end of an address's domain, and goes with it). Two names differing only
    in what is redacted read the same."""
    return "/".join(_redact_name(name) for name in path.split("/"))


def _redact_name(name: str) -> str:
    stem, extensions = name, ""
    while (suffix := PurePosixPath(stem).suffix.lower()) in _FILE_EXTENSIONS:
        stem, extensions = stem[: -len(suffix)], stem[-len(suffix):] + extensions
    return redact(stem)[0] + extensions


def _whole_word(match: re.Match[str], kind: str, counts: Counter[str]) -> str:
    """The kind's token for a match that is a word of its own; the match itself inside a longer word."""
    text, start, end = match.string, match.start(), match.end()
    if (start and _is_word_char(text[start - 1])) or (end < len(text) and _is_word_char(text[end])):
        return match.group()
    counts[kind] += 1
    return REPLACEMENTS[kind]


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _redact_secrets_in_context(text: str, counts: Counter[str]) -> str:
    """AWS secret access keys after a mention, then values assigned to a secret's name. Both find
    their words in the lower-cased text, at the text's positions: ``None`` where lower-casing
    changes a character's length (then a regular expression finds them, slower)."""
    lowered = _lower_case_aligned(text)
    redacted = _redact_aws_secret_keys(text, lowered, counts)
    if redacted is not text:
        text, lowered = redacted, _lower_case_aligned(redacted)
    return _redact_assigned_secrets(text, lowered, counts)


def _lower_case_aligned(text: str) -> str | None:
    lowered = text.lower()
    return lowered if len(lowered) == len(text) else None


def _redact_assigned_secrets(text: str, lowered: str | None, counts: Counter[str]) -> str:
    """The value of each assignment to a name that ends in secret, token, password, api_key, ...:
    a secret of any vendor, or none, is known by the name it is given."""
    pieces, last = [], 0
    for name_end in _secret_name_ends(text, lowered):
        if name_end < last:
            continue
        assigned = _SECRET_ASSIGNED.match(text, name_end)
        if assigned is None:
            continue
        group = "quoted" if assigned["quoted"] is not None else "bare"
        if not _is_secret_value(assigned[group], quoted=group == "quoted"):
            continue
        pieces += [text[last:assigned.start(group)], REPLACEMENTS["secret"]]
        last = assigned.end(group)
        counts["secret"] += 1
    return "".join([*pieces, text[last:]]) if pieces else text


def _secret_name_ends(text: str, lowered: str | None) -> list[int]:
    """Where each word that can end a secret's name ends, in order (any case)."""
    if lowered is None:
        return [name.end() for name in _SECRET_NAME_ANY_CASE.finditer(text)]
    ends = []
    for word in _SECRET_NAME_WORDS:
        for position in _find_all(lowered, word):
            if word == "passw":
                ends += [position + len(full) for full in ("password", "passwd") if lowered.startswith(full, position)]
            elif word != "key" or lowered.endswith(_KEY_QUALIFIERS, 0, position):
                ends.append(position + len(word))
    return sorted(ends)


def _is_secret_value(value: str, quoted: bool) -> bool:
    """A literal that can be a secret: mixing kinds of characters (a word such as ``"password"`` or
    ``bearer`` is none); unquoted, also holding a digit and a letter and not naming code
    (``self.token``, ``next_token2``), a variable (``$TOKEN``, ``%(pass)s``) or a placeholder."""
    if value[0] in "$%{<":  # a variable, a format placeholder, or a value redacted already
        return False
    kinds = (any(char.islower() for char in value), any(char.isupper() for char in value),
             any(char.isdigit() for char in value), any(not char.isalnum() for char in value))
    if sum(kinds) < 2:
        return False
    if quoted:
        return True
    lower, upper, digit = kinds[:3]
    if not digit or not (lower or upper):
        return False
    # A name in code (``token2``, ``next_token``, ``self.token``) rarely mixes both cases and digits; a key does.
    return not (_IDENTIFIER.fullmatch(value) and ("." in value or "_" in value)) or (lower and upper)


def _redact_aws_secret_keys(text: str, lowered: str | None, counts: Counter[str]) -> str:
    """Each 40-character AWS secret access key (base64 mixing upper and lower case and digits)
    starting within ``_AWS_CONTEXT_CHARS`` after a mention of AWS, a secret or an access key id: as
    in a credentials CSV or ``aws configure set``. Only those stretches are scanned; ``text`` itself
    when nothing was redacted."""
    pieces, last = [], 0
    for start, end in _aws_stretches(text if lowered is None else lowered):
        for key in _AWS_SECRET_KEY.finditer(text, max(start, last), min(end, len(text))):
            value = key.group()
            if (any(char.isdigit() for char in value) and any(char.islower() for char in value)
                    and any(char.isupper() for char in value)):  # a hex digest or a word run has one case
                pieces += [text[last:key.start()], REPLACEMENTS["secret"]]
                last = key.end()
                counts["secret"] += 1
    return "".join([*pieces, text[last:]]) if pieces else text


def _aws_stretches(lowered: str) -> list[tuple[int, int]]:
    """The stretches after each mention where a key may lie (a key's 40 characters and the one
    after it, read by the lookahead), merged where they overlap."""
    mentions = sorted(position for word in _AWS_CONTEXT for position in _find_all(lowered, word))
    stretches: list[tuple[int, int]] = []
    for position in mentions:
        end = position + _AWS_CONTEXT_CHARS + 41
        if stretches and position <= stretches[-1][1]:
            stretches[-1] = (stretches[-1][0], end)
        else:
            stretches.append((position, end))
    return stretches


def _find_all(text: str, word: str) -> Iterator[int]:
    position = text.find(word)
    while position != -1:
        yield position
        position = text.find(word, position + 1)


def _redact_emails(text: str, counts: Counter[str]) -> str:
    """Each ``@``: its local part read backwards from it, its domain forwards."""
    pieces, last = [], 0
    for at in _EMAIL_AT.finditer(text):
        position = at.start()
        if position < last:
            continue
        local = _EMAIL_LOCAL.search(text, max(last, position - _EMAIL_LOCAL_MAX), position)
        domain = _EMAIL_DOMAIN.match(text, position + 1)
        if local is None or domain is None:
            continue
        start = local.start()
        if start and (_is_word_char(text[start - 1]) or text[start - 1] in ".%+-"):
            continue  # the local part would be longer than an address's
        pieces += [text[last:start], REPLACEMENTS["email"]]
        last = domain.end()
        counts["email"] += 1
    return "".join([*pieces, text[last:]]) if pieces else text


def _redact_numbers(text: str, counts: Counter[str]) -> str:
    """Each run of digits and separators, read with a character of context on either side (the
    rules' lookarounds need it: a number glued to a word is part of that word)."""
    pieces, last = [], 0
    for run in _NUMBERISH.finditer(text):
        candidate = run.group()
        if candidate.isdigit() and not 13 <= len(candidate) <= 19:
            continue  # a plain number: too short or long for a card, and no separators
        start, end = max(run.start() - 1, last), min(run.end() + 1, len(text))
        window = text[start:end]
        redacted = _CARD.sub(lambda match: _accepted(match, "credit_card", _is_card, counts), window)
        redacted = _PHONE.sub(lambda match: _accepted(match, "phone", _is_phone_number, counts), redacted)
        redacted = _IP.sub(lambda match: _accepted(match, "ip_address", _is_ip_address, counts), redacted)
        if redacted != window:
            pieces += [text[last:start], redacted]
            last = end
    return "".join([*pieces, text[last:]]) if pieces else text


def _accepted(match: re.Match[str], kind: str, accept, counts: Counter[str]) -> str:
    if accept is not None and not accept(match.group()):
        return match.group()
    counts[kind] += 1
    return REPLACEMENTS[kind]


def _is_phone_number(number: str) -> bool:
    """8 to 15 digits: E.164's longest, and more than a short code or an extension."""
    return 8 <= sum(char.isdigit() for char in number) <= 15


def _is_card(number: str) -> bool:
    digits = number.replace(" ", "").replace("-", "")
    return any(prefix.match(digits) and len(digits) in lengths for prefix, lengths in _CARD_NETWORKS) and (
        luhn_valid(digits))


def luhn_valid(digits: str) -> bool:
    """The payment-card checksum: doubling every second digit from the right, the sum ends in 0."""
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_ip_address(quad: str) -> bool:
    """Four parts of 0-255 without leading zeros, not two single digits first: a version or a
    section number (``1.2.3.4``, ``2.7.18.1``, ``8.2.4.44``), or one of the few public resolvers
    (``8.8.4.4``, ``1.1.1.1``), which are no one's personal data."""
    parts = quad.split(".")
    return (all(int(part) <= 255 and (part == "0" or not part.startswith("0")) for part in parts)
            and not (len(parts[0]) == 1 and len(parts[1]) == 1))
