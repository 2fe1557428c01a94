"""PII masking and audit records (router/trust.py): what is masked, what is not."""
import json

import pytest

from router.trust import AuditRecord, build_audit_record, luhn_ok, mask_text, mask_texts


def masked(text: str) -> str:
    return mask_text(text)[0]


@pytest.mark.parametrize("text,want", [
    ("write to jane@example.com please", "write to [EMAIL] please"),
    ("john.doe+orders@mail.example.co.uk", "[EMAIL]"),
    ("A_B-c.d@sub-domain.example.io, thanks", "[EMAIL], thanks"),
    ("<USER@EXAMPLE.COM>", "<[EMAIL]>"),
    ("mailto:ops.team@acme-corp.com.", "mailto:[EMAIL]."),
    ("user123@host42.net", "[EMAIL]"),
])
def test_emails_are_masked(text: str, want: str) -> None:
    assert masked(text) == want


@pytest.mark.parametrize("text,want", [
    ("call +1 (415) 555-0132 today", "call [PHONE] today"),
    ("415-555-0132", "[PHONE]"),
    ("(415) 555-0132", "[PHONE]"),
    ("(415)555-0132", "[PHONE]"),
    ("415.555.0132", "[PHONE]"),
    ("415 555 0132", "[PHONE]"),
    ("1-415-555-0132", "[PHONE]"),
    ("+1-415-555-0132", "[PHONE]"),
    ("+14155550132", "[PHONE]"),
    ("London: +44 20 7946 0958.", "London: [PHONE]."),
    ("+44 (0)20 7946 0958", "[PHONE]"),
    ("0044 20 7946 0958", "[PHONE]"),
    ("+33 1 23 45 67 89", "[PHONE]"),
    ("+49 30 12345678", "[PHONE]"),
    ("+4915112345678", "[PHONE]"),
    ("020 7946 0958", "[PHONE]"),
    ("07700 900123", "[PHONE]"),
    ("01 23 45 67 89", "[PHONE]"),
    ("(020) 7946 0958", "[PHONE]"),
    ("(02) 9876 5432", "[PHONE]"),
    ("call me at 4155550132", "call me at [PHONE]"),
    ("Phone: 555-0132", "Phone: [PHONE]"),
    ("my mobile number is 0612345678", "my mobile number is [PHONE]"),
    ("tel. 415-555-0132 or +44 20 7946 0958", "tel. [PHONE] or [PHONE]"),
    ("+44 20 7946 0958 2024", "[PHONE] 2024"),          # the year after it stays
])
def test_phones_are_masked(text: str, want: str) -> None:
    assert masked(text) == want


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1111",          # Visa test card
    "4111-1111-1111-1111",
    "4111111111111111",
    "5555 5555 5555 4444",          # Mastercard
    "2223 0031 2200 3222",          # Mastercard 2-series
    "378282246310005",              # Amex
    "3782 822463 10005",
    "6011 1111 1111 1117",          # Discover
    "3530111333300000",             # JCB
    "4222222222222",                # 13-digit Visa
])
def test_luhn_valid_cards_are_masked(text: str) -> None:
    out, counts = mask_text(f"pay with {text}, ok")
    assert out == "pay with [CARD], ok" and counts == {"card": 1}


@pytest.mark.parametrize("text", [
    "order 1042 shipped",
    "order #1042 and #1043",
    "in 2024 and 1999",
    "on 2024-01-15 at 10:30",
    "due 15.01.2024 or 01/02/2024 or 01-02-2024",
    "a call on 2024-01-15",
    "costs $1,299.00 (was $1,499.99)",
    "1,000,000 rows",
    "from 192.168.1.10 and 10.0.0.255",
    "version 10.15.7, v2.31.0, 1.2.3.4",
    "ISBN 978-3-16-148410-0 and 978-0-306-40615-7",
    "zip 94103, ticket 123456, id A-10423",
    "between 100-2000 ms",
    "pi is 3.14159265358979",
    "4111 1111 1111 1112",          # fails Luhn
    "4111111111111112",
    "1234 5678 9012 3456",          # fails Luhn
    "ts 1700000000000",             # epoch ms, starts with 1
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "@handle and foo@localhost",
    "3 x 12 = 36",
    "SSN-like 123-45-6789 is out of scope",
])
def test_things_that_are_not_pii_stay(text: str) -> None:
    out, counts = mask_text(text)
    assert out == text and not counts


def test_counts_per_kind_and_several_texts() -> None:
    texts = ["mail a@b.io or c@d.io", "card 4111 1111 1111 1111, call 415-555-0132",
             "nothing here, order 1042"]
    out, counts = mask_texts(texts)
    assert out == ["mail [EMAIL] or [EMAIL]", "card [CARD], call [PHONE]", "nothing here, order 1042"]
    assert counts == {"email": 2, "card": 1, "phone": 1}
    assert mask_texts([]) == ([], {})


def test_an_email_with_digits_is_one_email_not_a_phone() -> None:
    assert mask_text("4155550132@sms.example.com") == ("[EMAIL]", {"email": 1})


def test_kinds_can_be_limited() -> None:
    text = "a@b.io 415-555-0132"
    assert mask_text(text, kinds=["phone"]) == ("a@b.io [PHONE]", {"phone": 1})
    with pytest.raises(ValueError, match="ssn"):
        mask_text(text, kinds=["ssn"])


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_long_inputs_stay_fast() -> None:
    # pathological runs for the email and phone patterns: linear, not quadratic
    blob = "a" * 200_000 + " " + "1-" * 50_000 + " " + "a." * 50_000
    assert mask_text(blob)[0] == blob


def test_audit_record_has_counts_and_ids_but_no_pii() -> None:
    text = "jane@example.com, +1 (415) 555-0132, 4111 1111 1111 1111"
    out, counts = mask_text(text)
    record = build_audit_record(request_id="r-1", tenant="acme", model="llm", pipeline="support",
                                counts=counts, timestamp=1_700_000_000.5)
    assert record == {"request_id": "r-1", "tenant": "acme", "model": "llm", "pipeline": "support",
                      "timestamp": 1_700_000_000.5, "masked": {"email": 1, "phone": 1, "card": 1}}
    line = json.dumps(record)
    for secret in ("jane", "example.com", "415", "0132", "4111", text):
        assert secret not in line
    assert AuditRecord("r", "t", "m", "", 0.0).masked == {"email": 0, "phone": 0, "card": 0}
    with pytest.raises(ValueError, match="unknown kind"):
        AuditRecord("r", "t", "m", "", 0.0, masked={"jane@example.com": 1})
    with pytest.raises(ValueError, match="count"):
        AuditRecord("r", "t", "m", "", 0.0, masked={"email": "jane@example.com"})
