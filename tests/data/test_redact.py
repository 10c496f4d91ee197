"""Redaction of personal data and secrets: each kind found and replaced in place, nothing else
touched (a labelled sample, and the standard library's version strings and hex constants), and
the ingest stage's units keyed by the setting."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig
from gptflow.data.ingest import ingest_corpus
from gptflow.data.redact import REPLACEMENTS, redact, redact_path
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import SKIP_UNSUPPORTED, resolve_sources

PRIVATE_KEY = ("-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
               "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\n-----END RSA PRIVATE KEY-----")
# What each kind must find: the value as it appears in text, and its kind.
POSITIVES = [
    ("jane.doe@example.com", "email"), ("first+tag@mail.sub.example.co.uk", "email"),
    ("+1 415 555 2671", "phone"), ("+44 20 7946 0958", "phone"), ("(415) 555-2671", "phone"),
    ("415-555-2671", "phone"), ("+49-30-901820", "phone"),
    ("192.168.1.20", "ip_address"), ("10.0.0.1", "ip_address"), ("203.0.113.195", "ip_address"),
    ("4111 1111 1111 1111", "credit_card"), ("5500-0000-0000-0004", "credit_card"),
    ("378282246310005", "credit_card"), ("6011111111111117", "credit_card"),
    ("AKIAIOSFODNN7EXAMPLE", "secret"), ("ghp_" + "a1B2" * 9, "secret"),
    ("AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"[:35], "secret"),
    ("sk-" + "Tq3x" * 12, "secret"), ("xoxb-1234567890-abcdefghij", "secret"),
    (PRIVATE_KEY, "private_key"),
]
# What none may touch: numbers and names that look a little like the kinds above.
NEGATIVES = [
    "version 3.11.7", "__version__ = '2.6.1'", "1.2.3.4", "8.2.4.44 Bogus comment state", "192.168.1",
    "256.1.1.1", "010.1.2.3", "2026-12-01", "12:30:45", "ISBN 978-3-16-148410-0", "0xDEADBEEF",
    "0x7fffffffffffffff", "4111 1111 1111 1112", "1234567890123456", "3.141592653589793",
    "x = 676.5203681218835 / z", "@property", "user@localhost", "a@b", "decorator @functools.wraps",
    "mask & 0xFFFF0000", "range(10000000)", "1e-10", "call 555-1234", "akia_lowercase_name",
    "task-queue sk-short", "ghp_tooshort", "2.7.18.1 released", "-----BEGIN CERTIFICATE-----",
]


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
# Secrets known by their context, whatever their vendor: each form as written, and as it must be stored.
SECRETS_IN_CONTEXT = [
    (f'AWS_SECRET_ACCESS_KEY = "{AWS_SECRET}"', 'AWS_SECRET_ACCESS_KEY = "<SECRET>"'),
    (f"export AWS_SECRET_ACCESS_KEY={AWS_SECRET}", "export AWS_SECRET_ACCESS_KEY=<SECRET>"),
    (f"[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {AWS_SECRET}\n",
     "[default]\naws_access_key_id = <SECRET>\naws_secret_access_key = <SECRET>\n"),
    (f'{{"AccessKeyId": "ASIAIOSFODNN7EXAMPLE", "SecretAccessKey": "{AWS_SECRET}"}}',
     '{"AccessKeyId": "<SECRET>", "SecretAccessKey": "<SECRET>"}'),
    (f"secret_access_key: {AWS_SECRET}", "secret_access_key: <SECRET>"),
    (f"User,Access key ID,Secret access key\nci,AKIAIOSFODNN7EXAMPLE,{AWS_SECRET}",
     "User,Access key ID,Secret access key\nci,<SECRET>,<SECRET>"),
    (f"aws configure set aws_secret_access_key {AWS_SECRET}", "aws configure set aws_secret_access_key <SECRET>"),
    ("password = 'hunter2!'", "password = '<SECRET>'"),
    ("DB_PASSWD=hunter2000", "DB_PASSWD=<SECRET>"), ("DB_PASSWORD=U0vntBQ9uB7_", "DB_PASSWORD=<SECRET>"),
    ('client_secret: "Zq8xW1vT9u"', 'client_secret: "<SECRET>"'),
    ("config.api_key := 'k3y-v4lue-xyz'", "config.api_key := '<SECRET>'"),
    (":auth_token => 'b7c1d2e3f4a5'", ":auth_token => '<SECRET>'"),
]
# Assignments to a secret's name that hold no secret: code, variables, words, placeholders.
NOT_SECRETS = [
    "token = self.get_token()", "token = next_token2", "password = getpass.getpass()", "self.token = nextchar",
    "cache_token = current_token",
    'api_key = os.environ["API_KEY"]', "AWS_SECRET_ACCESS_KEY=$AWS_SECRET", 'token_type = "Bearer"',
    'password = "password"', "pwd = os.getcwd()", "secret = secrets.token_hex(16)", 'if password == "abc12345":',
    "password: str = None", '"password": "%(password)s"', "Token: the next token of the stream",
    "sha1 = 3f2a9c1b3f2a9c1b3f2a9c1b3f2a9c1b3f2a9c1b  # AWS release", f"{AWS_SECRET} alone on its line",
    "monkey = 'Banana1234'", "ACCESS_KEY_ID_LENGTH = 'twenty20'",
]


@pytest.mark.parametrize(("text", "stored"), SECRETS_IN_CONTEXT, ids=[str(i) for i in range(len(SECRETS_IN_CONTEXT))])
def test_secrets_are_found_by_their_context_and_only_the_value_is_replaced(text, stored):
    redacted, counts = redact(text)
    assert redacted == stored
    assert counts == {"secret": stored.count("<SECRET>")}


@pytest.mark.parametrize("text", NOT_SECRETS)
def test_assignments_to_a_secret_s_name_that_hold_no_secret_are_left_alone(text):
    assert redact(text) == (text, {})


@pytest.mark.parametrize(("value", "kind"), POSITIVES, ids=[kind + str(i) for i, (_, kind) in enumerate(POSITIVES)])
def test_each_kind_is_replaced_in_place_and_counted(value, kind):
    text = f"Contact: {value}. Thanks!"
    redacted, counts = redact(text)
    assert redacted == f"Contact: {REPLACEMENTS[kind]}. Thanks!"
    assert counts == {kind: 1}


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_left_alone(text):
    assert redact(text) == (text, {})


def test_a_document_with_several_kinds_keeps_its_shape():
    text = ("# Author: Jane Doe <jane.doe@example.com>\nHOST = '10.20.30.40'  # call +1 415 555 2671\n"
            "KEY = 'AKIAIOSFODNN7EXAMPLE'\ncard = '4111-1111-1111-1111'\nversion = '3.11.7'\n")
    redacted, counts = redact(text)
    assert redacted == ("# Author: Jane Doe <<EMAIL>>\nHOST = '<IP_ADDRESS>'  # call <PHONE>\n"
                        "KEY = '<SECRET>'\ncard = '<CREDIT_CARD>'\nversion = '3.11.7'\n")
    assert counts == {"email": 1, "ip_address": 1, "phone": 1, "secret": 1, "credit_card": 1}


def test_the_standard_library_s_version_strings_and_hex_constants_are_not_redacted():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(path.read_text(errors="replace") for path in sorted(stdlib.rglob("*.py"))
                     if "site-packages" not in path.parts)
    versions = set(re.findall(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text))
    hex_constants = set(re.findall(r"\b0[xX][0-9a-fA-F]+\b", text))
    floats = set(re.findall(r"\b\d+\.\d+(?:[eE][-+]?\d+)?\b", text))
    assert len(versions) > 10 and len(hex_constants) > 100 and len(floats) > 100
    for value in sorted(versions | hex_constants | floats):
        line = f"value = {value!r}  # {value}"
        assert redact(line) == (line, {}), value


def test_redaction_keys_the_units_and_turning_it_off_reuses_the_old_ones(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "contacts.txt").write_text("Write to jane.doe@example.com or call +1 415 555 2671.\n" * 3
                                         + "Server at 192.168.1.20.\n")
    (corpus / "clean.txt").write_text("Nothing personal here, only version 3.11.7 and 0xFF.\n")
    sources = resolve_sources([str(corpus)])
    store = tmp_path / "store"

    plain = ingest_corpus(sources, IngestConfig(val_fraction=0.3), store, required_splits=())
    redacted = ingest_corpus(sources, IngestConfig(val_fraction=0.3, redact_pii=True), store, required_splits=())
    again = ingest_corpus(sources, IngestConfig(val_fraction=0.3), store, required_splits=())

    assert {unit.key for unit in redacted.units}.isdisjoint({unit.key for unit in plain.units})
    assert not any(unit.reused for unit in redacted.units)
    assert [unit.key for unit in again.units] == [unit.key for unit in plain.units]
    assert all(unit.reused for unit in again.units)
    by_source = {Path(unit.source).name: unit.redactions for unit in redacted.units}
    assert by_source == {"contacts.txt": {"email": 3, "phone": 3, "ip_address": 1}, "clean.txt": {}}
    assert redacted.totals["redactions"] == {"email": 3, "phone": 3, "ip_address": 1}
    assert plain.totals["redactions"] == {}
    [contacts] = [unit for unit in redacted.units if unit.source.endswith("contacts.txt")]
    texts = "".join(text for batch in iter_raw_batches(Path(contacts.directory), ["text"])
                    for text in batch.column(0).to_pylist())
    assert "jane.doe" not in texts and "<EMAIL>" in texts and "<PHONE>" in texts and "<IP_ADDRESS>" in texts


@pytest.mark.parametrize(("path", "shown"), [
    ("/mail/jane.doe@example.com.jsonl.gz", "/mail/<EMAIL>.jsonl.gz"),
    ("s3://bucket/hosts/10.20.30.40/a@b.co.uk.txt", "s3://bucket/hosts/<IP_ADDRESS>/<EMAIL>.txt"),
    ("/calls/+1 415 555 2671.md", "/calls/<PHONE>.md"),
    ("/data/v3.11.7/notes.txt", "/data/v3.11.7/notes.txt"),
])
def test_a_path_s_names_are_redacted_one_by_one_keeping_their_extensions(path, shown):
    assert redact_path(path) == shown


def test_file_names_that_carry_personal_data_are_written_nowhere_when_redacting(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "jane.doe@example.com.txt").write_text("Notes from a mailbox, kept for training.\n" * 40)
    (corpus / "bob@example.org.docx").write_bytes(b"PK")
    (corpus / "plain.txt").write_text("Nothing personal in this one.\n" * 40)
    store = tmp_path / "store"

    manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3, redact_pii=True), store,
                             required_splits=())

    assert sorted(unit.source for unit in manifest.units) == [str(corpus / "<EMAIL>.txt"), str(corpus / "plain.txt")]
    # .docx is no format gptflow reads: it may as well be the end of the address's domain.
    assert manifest.skips.examples == {SKIP_UNSUPPORTED: [str(corpus / "<EMAIL>")]}
    written = [path for path in store.rglob("*") if path.is_file()]
    assert any(path.name == "unit.json" for path in written) and any("manifests" in path.parts for path in written)
    for path in written:
        if path.suffix == ".json":
            assert "@example" not in path.read_text(), path
    # Without redaction, the manifest names the file as it is.
    plain = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3), store, required_splits=())
    assert str(corpus / "jane.doe@example.com.txt") in {unit.source for unit in plain.units}
