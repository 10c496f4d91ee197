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


def test_redaction_counts_are_logged_per_kind_and_per_file(prefect_api_url, tiny_corpus_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    contacts = corpus / "zz_contacts.py"
    contacts.write_text('"""Maintainers."""\nOWNERS = {\n    "jane": ("jane.doe@example.com", "+1 415 555 2671"),\n'
                        '    "build": ("ci@example.org", "10.20.30.40"),\n}\nTOKEN = "AKIAIOSFODNN7EXAMPLE"\n')
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
    assert logged["by_source"][str(contacts)] == {"email": 2, "phone": 1, "ip_address": 1, "secret": 1}
    # The standard library's own files hold e-mail addresses of their authors, and nothing else may differ.
    assert {kind: count for kind, count in redacted.items() if count} == logged["total"]
    assert all(redacted[kind] >= count for kind, count in logged["by_source"][str(contacts)].items())
    assert logged["total"] == {kind: sum(found.get(kind, 0) for found in logged["by_source"].values())
                               for kind in logged["total"]}
