"""``--set data.redact_pii=true`` end to end: a real pretrain on a tiny corpus holding personal data,
a real Prefect server and a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.flows.pretrain import pretrain

pytestmark = pytest.mark.slow
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_redaction_counts_are_logged_and_nothing_written_holds_the_secret_or_the_pii_of_a_file_name(
    prefect_api_url, tiny_corpus_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    contacts = corpus / "zz_contacts.py"
    contacts.write_text('"""Maintainers."""\nOWNERS = {\n    "jane": ("jane.doe@example.com", "+1 415 555 2671"),\n'
                        '    "build": ("ci@example.org", "10.20.30.40"),\n}\nTOKEN = "AKIAIOSFODNN7EXAMPLE"\n'
                        f'AWS_SECRET_ACCESS_KEY = "{AWS_SECRET}"\n')
    # A file named by an e-mail address, and one skipped: their names are personal data too.
    (corpus / "jane.roe@example.net.txt").write_text("Notes kept from a mailbox, to be trained on.\n" * 50)
    (corpus / "bob.roe@example.net.docx").write_bytes(b"PK")
    workspace = tmp_path / "workspace"

    summary = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(workspace),
                       overrides={"data.redact_pii": True, "train.max_steps": 2, "eval.eval_tokens": 512})

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    params = client.get_run(summary.mlflow_run_id).data.params
    assert params["data.redact_pii"] == "True"
    redacted = {kind: int(params[f"dataset.redacted.{kind}"]) for kind in
                ("email", "phone", "ip_address", "credit_card", "secret", "private_key")}
    logged = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/redactions.json",
                                                       str(tmp_path))).read_text())
    assert logged["by_source"][str(contacts)] == {"email": 2, "phone": 1, "ip_address": 1, "secret": 2}
    # The standard library's own files hold e-mail addresses of their authors, and nothing else may differ.
    assert {kind: count for kind, count in redacted.items() if count} == logged["total"]
    assert all(redacted[kind] >= count for kind, count in logged["by_source"][str(contacts)].items())
    assert logged["total"] == {kind: sum(found.get(kind, 0) for found in logged["by_source"].values())
                               for kind in logged["total"]}

    # Neither the secret nor the names are in anything the run wrote: the store, the task cache,
    # the MLflow store and its artifacts (data/corpus-*.json among them).
    [manifest] = [name for name in _artifact_names(client, summary.mlflow_run_id, "data") if "corpus-" in name]
    logged_manifest = Path(client.download_artifacts(summary.mlflow_run_id, manifest, str(tmp_path))).read_text()
    assert str(corpus / "<EMAIL>.txt") in logged_manifest and str(corpus / "<EMAIL>") in logged_manifest
    written = [path for path in workspace.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in written)
    for path in written:
        content = path.read_bytes()
        assert b"example.net" not in content and AWS_SECRET.encode() not in content, path


def _artifact_names(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return [artifact.path for artifact in client.list_artifacts(run_id, folder)]
