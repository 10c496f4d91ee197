"""bench/gpu_train.py runs end to end (tiny, on the CPU) and stays importable on a bare GPU box."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "gpu_train.py"


def test_the_gpu_bench_imports_no_orchestration_or_tracking():
    imported = set()
    for node in ast.walk(ast.parse(BENCH.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    upper = {name for name in imported if name.split(".")[0] in ("prefect", "mlflow")
             or name.startswith(("gptflow.tasks", "gptflow.flows"))}
    assert imported and not upper, upper


@pytest.mark.slow
def test_smoke_run_reports_every_section(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"], cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_train.json").read_text())
    assert results["matmul"]["flops_per_s"] > 0
    for name in ("nanogpt_baseline", "gptflow_fast_path"):
        assert results["throughput"][name]["tokens_per_s"] > 0 and 0 < results["throughput"][name]["mfu"] < 1
    assert set(results["presets"]) == {"tiny/ddp", "tiny/fsdp", "tiny-recomputed/ddp", "tiny-recomputed/fsdp"}
    assert all(row["tokens_per_s"] > 0 for row in results["presets"].values())
    learning = results["learning"]
    assert set(learning["runs"]) == {"gpt2", "modern", "modern_half"}
    assert learning["budget_tokens"] == learning["runs"]["gpt2"]["curve"][-1][0]
    assert 0.4 < learning["runs"]["modern_half"]["curve"][-1][0] / learning["budget_tokens"] <= 0.5
    table = completed.stdout.strip().splitlines()[-12:]  # the table is printed last
    assert any(line.startswith("speedup") for line in table)
    assert any(line.startswith("modern reaches gpt2's") for line in table)
