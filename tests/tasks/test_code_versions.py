"""Code versions, the code part of every stage's cache key: they follow the code that computes a
stage, found from its imports, and nothing else (``data.code_version``). Each test edits a copy of
gptflow's source and computes the stages' code versions in a process that imports that copy."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from gptflow.data.code_version import code_closure, normalised_source

STAGE_MODULES = ("ingest", "tokenizer", "tokenize", "training", "evaluation", "multiple_choice", "classification",
                 "tagging", "finetuning", "lm_eval", "model_import")
DATA_STAGES = {"ingest", "tokenizer", "tokenize"}


def _stage_code_versions(source_root: Path) -> dict[str, str]:
    """Each stage module's code version, computed by a process that imports gptflow from ``source_root``."""
    probe = (
        "import json\n"
        "from gptflow.data.code_version import code_version, module_file\n"
        f"assert str(module_file('gptflow.data.code_version')).startswith({str(source_root)!r})\n"
        f"print(json.dumps({{stage: code_version('gptflow.tasks.stages.' + stage) for stage in {STAGE_MODULES!r}}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(source_root)},
                          cwd=source_root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


def _insert_first_in(path: Path, qualified_name: str, statement: str) -> None:
    """Insert ``statement`` as the first statement of the function or class ``qualified_name``
    (``GPT.forward``) in the source file ``path``, after its docstring."""
    source = path.read_text()
    scope: ast.AST = ast.parse(source)
    for name in qualified_name.split("."):
        scope = next(node for node in ast.iter_child_nodes(scope)
                     if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name)
    first = scope.body[0]
    lines = source.splitlines(keepends=True)
    at = first.end_lineno if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else first.lineno - 1
    lines.insert(at, " " * first.col_offset + statement + "\n")
    path.write_text("".join(lines))


def _edit_documentation(path: Path) -> None:
    """Add a comment line, reword every docstring and reflow nothing else of the source file ``path``."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for statement in body:
            if (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)):
                line = lines[statement.lineno - 1]
                quote = statement.col_offset + (1 if line[statement.col_offset] in "rRbBuU" else 0)
                width = 3 if line[quote:quote + 3] in ('"""', "'''") else 1
                lines[statement.lineno - 1] = line[:quote + width] + "Reworded. " + line[quote + width:]
    path.write_text("# A comment added at the top.\n" + "".join(lines))


def test_every_stage_has_a_code_version_of_its_own(gptflow_copy):
    assert len(set(_stage_code_versions(gptflow_copy).values())) == len(STAGE_MODULES)


def test_docstrings_and_comments_are_no_part_of_any_code_version(gptflow_copy):
    before = _stage_code_versions(gptflow_copy)
    sources = sorted((gptflow_copy / "gptflow").rglob("*.py"))
    for path in sources:
        _edit_documentation(path)
    assert "Reworded. " in (gptflow_copy / "gptflow" / "data" / "store.py").read_text()
    assert _changed(before, _stage_code_versions(gptflow_copy)) == set()


def test_reporting_tracking_launching_and_the_cli_are_no_part_of_any_code_version(gptflow_copy):
    before = _stage_code_versions(gptflow_copy)
    package = gptflow_copy / "gptflow"
    for module in ("tasks/tracking/run.py", "tasks/tracking/outbox.py", "tasks/tracking/progress.py",
                   "tasks/tracking/training_reporter.py", "tasks/runtime/torchrun.py", "tasks/runtime/rendezvous.py",
                   "data/mirror.py", "flows/cli.py", "flows/pretrain.py"):
        path = package / module
        path.write_text(path.read_text() + "\n\ndef added_behaviour():\n    return 42\n")
    _insert_first_in(package / "tasks" / "tracking" / "run.py", "PipelineRun.log_params", "params = dict(params)")
    assert _changed(before, _stage_code_versions(gptflow_copy)) == set()


def test_the_models_forward_pass_is_in_the_code_version_of_training_and_evaluation_not_of_the_data_stages(gptflow_copy):
    before = _stage_code_versions(gptflow_copy)
    _insert_first_in(gptflow_copy / "gptflow" / "model" / "gpt.py", "GPT.forward", "idx = idx.long()")
    changed = _changed(before, _stage_code_versions(gptflow_copy))
    assert {"training", "evaluation"} <= changed
    assert not changed & DATA_STAGES


def test_the_loader_is_in_trainings_code_version(gptflow_copy):
    before = _stage_code_versions(gptflow_copy)
    loader = gptflow_copy / "gptflow" / "data" / "loader.py"
    loader.write_text(loader.read_text() + "\n\nWINDOWS_PER_SHARD_GUESS = 16\n")
    changed = _changed(before, _stage_code_versions(gptflow_copy))
    assert "training" in changed
    assert not changed & DATA_STAGES


def test_editing_a_module_reached_only_indirectly_changes_exactly_the_stages_that_reach_it(gptflow_copy):
    before = _stage_code_versions(gptflow_copy)
    # model/lora.py: no stage module imports it; the fine-tuning loop (model/finetune.py) does.
    lora = gptflow_copy / "gptflow" / "model" / "lora.py"
    lora.write_text(lora.read_text() + "\n\nLORA_EDITED = True\n")
    assert _changed(before, _stage_code_versions(gptflow_copy)) == {"classification", "tagging", "finetuning"}


def test_a_helper_module_added_later_is_in_the_key_of_every_stage_that_imports_it(gptflow_copy):
    data = gptflow_copy / "gptflow" / "data"
    (data / "normalise.py").write_text("def normalise(text):\n    return text\n")
    readers = data / "readers.py"
    readers.write_text("from gptflow.data.normalise import normalise\n" + readers.read_text())
    before = _stage_code_versions(gptflow_copy)
    (data / "normalise.py").write_text("def normalise(text):\n    return text.strip()\n")
    assert _changed(before, _stage_code_versions(gptflow_copy)) == set(STAGE_MODULES)  # every stage reads documents


def test_the_libraries_that_shape_a_stage_are_in_its_code_version():
    assert set(code_closure("gptflow.tasks.stages.ingest")["libraries"]) >= {"pyarrow"}
    assert "torch" not in code_closure("gptflow.tasks.stages.ingest")["libraries"]
    assert set(code_closure("gptflow.tasks.stages.tokenize")["libraries"]) >= {"pyarrow", "tokenizers"}
    assert set(code_closure("gptflow.tasks.stages.training")["libraries"]) >= {"torch", "pyarrow"}


def test_normalised_source_keeps_code_and_drops_only_what_documents_it():
    documented = ast.parse('"""Module."""\nX = 1\n"""What X is."""\n\ndef f(a):  # why\n    """Doc."""\n    return a + X\n')
    bare = ast.parse("X = 1\ndef f(a):\n    return a + X\n")
    assert normalised_source(documented) == normalised_source(bare)
    assert normalised_source(ast.parse("def f(a):\n    return a - X\n")) != normalised_source(bare)
    assert normalised_source(ast.parse('def f():\n    """Only a docstring."""\n')) == "def f():\n    pass"
    assert normalised_source(ast.parse('X = "a string value"\n')) == "X = 'a string value'"
