"""The trust layer's policy: find PII in text and mask it before any model call.

Three kinds, each replaced by a fixed token with no trace of the value:

* ``email`` -> ``[EMAIL]``: local@domain.tld; plus-tags, dots, sub-domains.
* ``card``  -> ``[CARD]``: 13-19 digits, contiguous or in groups (4 first, then
  3-6 each) joined by one consistent space or dash, that pass the Luhn check.
  Contiguous runs must also start with 2-6 (Mastercard, Amex/JCB/Diners, Visa,
  Discover/UnionPay): that keeps the 10% of random long ids and most epoch-ms
  timestamps (13 digits starting with 1) that pass Luhn by chance unmasked.
* ``phone`` -> ``[PHONE]``: shapes, not bare digit runs -
  international (+CC or 00CC, then groups or one block; 8-15 digits, E.164),
  North American ((415) 555-0132, 415-555-0132, 415.555.0132, 1-415-...),
  an area code in parentheses ((020) 7946 0958), national numbers with a
  trunk 0 and one consistent separator (020 7946 0958, 01 23 45 67 89; 10-11
  digits), and any 7-15 digit run right after a cue word (phone, tel, mobile,
  cell, call, fax, whatsapp, sms, text: "call me at 4155550132").

Trade-offs, chosen because a masked order number costs little and a leaked phone
number is the failure the layer exists to prevent - but a layer that masks every
number makes the models useless (order ids, quantities, dates, prices, versions):

* Not masked (false negatives): bare digit runs with no shape and no cue
  ("4155550132" alone), 7-digit local numbers without a cue ("555-0132":
  indistinguishable from ranges like "100-2000"), obfuscated e-mails ("jo at
  example dot com"), addresses without a TLD ("root@localhost"), non-ASCII
  domains, card numbers split oddly ("41 11 11 ..."), contiguous card numbers
  starting with 1 or 7-9 (UATP, fleet cards), SSNs and other national ids.
* Masked by mistake (false positives): any 10-digit 3-3-4 group ("100 200 3000"),
  a Luhn-valid 13-19 digit id that starts with 2-6 (about 1 in 10 such ids),
  "(12) 345 678"-like references, a number right after "call"/"text".
* Never masked, by construction: order numbers like 1042, years, dates
  (2024-01-15, 15.01.2024, 01/02/2024), times, prices ($1,299.00), IPv4
  addresses, version numbers, ISBNs - a number glued to a letter, a dot or a
  dash on its left never starts a match.

Audit records (``build_audit_record``) carry ids and counts only: never the text,
never a matched value, not even hashed.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

KINDS = ("email", "phone", "card")
TOKENS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}

# A number never starts right after a word character, a dot, dash, slash or plus
# (versions, IPs, dates, ids like A-1042), nor ends before a word character or
# before a dot/dash/slash/comma followed by a digit (1.2.3, 2024-01-15, 1,299).
_L = r"(?<![\w.\-/+])"
_R = r"(?![\w])(?![.\-/,]\d)"
_SEP = r"[ .\-]"

_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9._%+\-]{1,64}@"           # bounded: linear time on long runs
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w\-])")

_CARD = re.compile(
    _L + r"(?:\d{13,19}|\d{4}(?P<s>[ \-])\d{3,6}(?:(?P=s)\d{3,6}){1,3})" + _R)

_PHONE_INTL = re.compile(
    r"(?<![\w.\-/+])(?:\+|\b00 ?)[1-9]\d{0,2}"          # + or 00, country code
    r"(?: ?\(\d{1,4}\))?"                               # (0) or (20)
    r"(?:\d{6,13}|" + _SEP + r"?\d{1,8}(?:" + _SEP + r"\d{1,8}){1,5})" + _R)

_PHONE_NANP = re.compile(
    _L + r"(?:1" + _SEP + r")?(?:\(\d{3}\)" + _SEP + r"?|\d{3}" + _SEP + r")\d{3}" + _SEP + r"\d{4}" + _R)

_PHONE_PAREN = re.compile(
    r"(?<![\w.\-/+])\(\d{2,5}\)" + _SEP + r"?\d{3,4}" + _SEP + r"?\d{3,4}" + _R)

_PHONE_TRUNK0 = re.compile(
    _L + r"0[1-9]\d{0,3}(?P<t>[ .\-])\d{2,8}(?:(?P=t)\d{2,8}){0,4}" + _R)

_PHONE_CUE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|mob|cell|call|fax|whatsapp|sms|text)"
    r"(?:\s+(?:me|us|him|her|them))?(?:\s*(?:at|on|is|:|#|no\.?|nr\.?|number)){0,2}\s*"
    r"(?P<num>\+?\d(?:" + _SEP + r"?\d){6,14})" + _R)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _card_span(m: re.Match) -> tuple[int, int] | None:
    digits = _digits(m.group())
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return None
    if m.group("s") is None and digits[0] not in "23456":
        return None
    return m.span()


def _trimmed(lo: int, hi: int) -> Callable[[re.Match], tuple[int, int] | None]:
    """Accept a match of lo..hi digits; if it ran on into a following number
    ("+44 20 7946 0958 2024"), drop trailing groups until it fits."""
    def span(m: re.Match) -> tuple[int, int] | None:
        text, start = m.group(), m.start()
        while True:
            n = len(_digits(text))
            if lo <= n <= hi:
                return start, start + len(text)
            cut = max(text.rfind(" "), text.rfind("."), text.rfind("-"))
            if n < lo or cut <= 0:
                return None
            text = text[:cut]
    return span


_DATE = re.compile(r"\d{4}([.\-/])\d{1,2}\1\d{1,2}|\d{1,2}([.\-/])\d{1,2}\2\d{2,4}")


def _cue_span(m: re.Match) -> tuple[int, int] | None:
    num = m.group("num")
    if _DATE.fullmatch(num):               # "a call on 2024-01-15" is a date
        return None
    return m.span("num") if 7 <= len(_digits(num)) <= 15 else None


def _email_span(m: re.Match) -> tuple[int, int] | None:
    return m.span()


# In order: e-mails first (they may hold digits), cards before phones (a card's
# groups look like a phone's), cue words last (they catch what has no shape).
_RULES: tuple[tuple[str, re.Pattern, Callable[[re.Match], tuple[int, int] | None]], ...] = (
    ("email", _EMAIL, _email_span),
    ("card", _CARD, _card_span),
    ("phone", _PHONE_INTL, _trimmed(8, 15)),
    ("phone", _PHONE_NANP, _trimmed(10, 11)),
    ("phone", _PHONE_PAREN, _trimmed(7, 12)),
    ("phone", _PHONE_TRUNK0, _trimmed(10, 11)),
    ("phone", _PHONE_CUE, _cue_span),
)


def mask_text(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter[str]]:
    """``text`` with every PII value of ``kinds`` replaced by its token, and how
    many of each kind were replaced."""
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"kinds: unknown {sorted(unknown)}; known: {list(KINDS)}")
    counts: Counter[str] = Counter()
    for kind, pattern, span_of in _RULES:
        if kind not in wanted:
            continue
        out, last = [], 0
        for m in pattern.finditer(text):
            span = span_of(m)
            if span is None or span[0] < last:
                continue
            out.append(text[last:span[0]])
            out.append(TOKENS[kind])
            last = span[1]
            counts[kind] += 1
        if out:
            out.append(text[last:])
            text = "".join(out)
    return text, counts


def mask_texts(texts: Iterable[str], kinds: Iterable[str] = KINDS) -> tuple[list[str], Counter[str]]:
    """Mask each text; counts are summed over all of them."""
    kinds = tuple(kinds)
    masked, total = [], Counter()
    for text in texts:
        out, counts = mask_text(text, kinds)
        masked.append(out)
        total.update(counts)
    return masked, total


@dataclass(frozen=True)
class AuditRecord:
    """What the trust layer did to one request: who, what, when, how many of
    each kind - and deliberately nothing that was masked."""

    request_id: str
    tenant: str
    model: str
    pipeline: str
    timestamp: float                       # wall-clock seconds, from the caller's clock
    masked: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = {kind: 0 for kind in KINDS}
        for kind, n in dict(self.masked).items():
            # Only known kinds and plain counts: a caller cannot smuggle a value in.
            if kind not in counts:
                raise ValueError(f"masked: unknown kind {kind!r}; known: {list(KINDS)}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"masked.{kind}: must be a count >= 0, not {n!r}")
            counts[kind] = n
        object.__setattr__(self, "masked", counts)

    @property
    def total(self) -> int:
        return sum(self.masked.values())

    def as_dict(self) -> dict:
        return {"request_id": self.request_id, "tenant": self.tenant, "model": self.model,
                "pipeline": self.pipeline, "timestamp": self.timestamp, "masked": dict(self.masked)}


def build_audit_record(*, request_id: str, tenant: str, model: str, pipeline: str,
                       counts: Mapping[str, int], timestamp: float) -> dict:
    """The JSON-ready audit record (see ``AuditRecord``)."""
    return AuditRecord(request_id=request_id, tenant=tenant, model=model, pipeline=pipeline,
                       timestamp=timestamp, masked=dict(counts)).as_dict()
