"""Cost of the data stages on reruns: first run, nothing changed, 5% more files.

    python bench/incremental_data.py                 # 200 MB generated corpus
    python bench/incremental_data.py --megabytes 400 --keep /tmp/corpus

Generates a corpus of JSONL files (documents cut from the standard library's source, each made
unique, so deduplication keeps them all), then runs ingest → tokenizer → tokenize through the real
Prefect tasks (cache keys, result records, MLflow logging) three times in one process: (a) a
first run into an empty workspace, (b) a rerun with nothing changed, (c) a rerun after adding 5%
more files. Each figure is the wall time of the flow's body, stages and MLflow logging included;
Prefect's fixed setup and teardown of a flow run comes on top of each and is printed apart (an
empty flow's run). Targets: (b) ≤ 5% of (a) beyond that fixed cost, (c) ≤ 10% of (a).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from gptflow.data.sources import resolve_sources  # noqa: E402
from gptflow.tasks.lineage import Lineage  # noqa: E402
from gptflow.tasks.runtime.unit_maps import UnitRunner  # noqa: E402
from gptflow.tasks.runtime.workspace import Workspace  # noqa: E402
from gptflow.tasks.settings import PretrainSettings, build_config  # noqa: E402
from gptflow.tasks.stages.ingest import ingest  # noqa: E402
from gptflow.tasks.stages.tokenize import tokenize  # noqa: E402
from gptflow.tasks.stages.tokenizer import prepare_tokenizer  # noqa: E402
from gptflow.tasks.tracking.run import pipeline_run

DOCUMENTS_PER_FILE = 100


@flow(name="bench-data-stages")
def data_stages(corpus: str, workspace: str) -> dict[str, object]:
    started = time.perf_counter()
    workspace_dir = Workspace.resolve(workspace)
    config = build_config(PretrainSettings, "cpu")
    lineage = Lineage.load(workspace_dir, [corpus])
    units = UnitRunner()  # in this process, as the CLI runs them without --ray
    with pipeline_run(workspace_dir, "pretrain", tags={}, name="bench-data-stages") as run:
        manifest = ingest(resolve_sources([corpus]), config.data, workspace_dir, run, units)
        tokenizer = prepare_tokenizer(manifest, config.tokenizer, workspace_dir, run, lineage, units)
        tokens = tokenize(manifest, tokenizer, config.tokenize, workspace_dir, run, units)
        lineage.commit(workspace_dir, manifest.path, tokens.path, run.run_id)
    return {
        "seconds": time.perf_counter() - started,
        "stages": dict(run.stage_statuses),
        "files_ingested": run.tags["gptflow.ingest.files_ingested"],
        "files_tokenized": run.tags["gptflow.tokenize.files_tokenized"],
        "tokens": tokens.total_tokens("train") + tokens.total_tokens("val"),
    }


@flow(name="bench-empty")
def empty_flow() -> None:
    """Prefect's fixed cost of one flow run, for reference."""


def write_corpus(directory: Path, first_file: int, n_files: int, lines: list[str], seed: int) -> int:
    rng = random.Random(seed)
    written = 0
    for index in range(first_file, first_file + n_files):
        records = []
        for doc in range(DOCUMENTS_PER_FILE):
            start = rng.randrange(len(lines) - 300)
            body = "".join(lines[start:start + rng.randint(30, 300)])
            records.append(json.dumps({"text": f"# document {index}-{doc}\n{body}"}))
        text = "\n".join(records) + "\n"
        (directory / f"part-{index:05d}.jsonl").write_text(text)
        written += len(text.encode())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=200, help="size of the first corpus (default 200)")
    parser.add_argument("--keep", type=Path, help="write the corpus and workspace here and keep them")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="gptflow-bench-"))
    corpus, workspace = root / "corpus", root / "workspace"
    corpus.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for path in sorted(stdlib.glob("*.py")) for line in path.read_text(errors="replace").splitlines(True)]
    average_file_bytes = write_corpus(Path(tempfile.mkdtemp()), 0, 1, lines, seed=-1)
    n_files = max(20, round(args.megabytes * 1e6 / average_file_bytes))
    corpus_bytes = write_corpus(corpus, 0, n_files, lines, seed=0)
    print(f"corpus   {n_files} JSONL files, {corpus_bytes / 1e6:.0f} MB, in {corpus}")

    with prefect_test_harness(server_startup_timeout=120):
        empty_flow()  # the first flow run of a process also pays for imports and client setup
        started = time.perf_counter()
        empty_flow()
        prefect_fixed = time.perf_counter() - started
        first = data_stages(str(corpus), str(workspace))
        unchanged = data_stages(str(corpus), str(workspace))
        added_files = max(1, round(n_files * 0.05))
        added_bytes = write_corpus(corpus, n_files, added_files, lines, seed=1)
        grown = data_stages(str(corpus), str(workspace))

    print(f"added    {added_files} files, {added_bytes / 1e6:.1f} MB ({added_bytes / corpus_bytes:.1%}) for (c)")
    print(f"prefect  fixed cost of a flow run (an empty flow, not in the figures below): {prefect_fixed:.2f} s\n")
    print(f"{'':24}{'seconds':>9}{'of (a)':>9}   stages")
    for label, result in (("(a) first run", first), ("(b) nothing changed", unchanged), ("(c) 5% more files", grown)):
        seconds = result["seconds"]
        stages = ", ".join(f"{name} {status}" for name, status in result["stages"].items())
        print(f"{label:24}{seconds:9.2f}{seconds / first['seconds']:9.1%}   {stages}; "
              f"files ingested {result['files_ingested']}, tokenized {result['files_tokenized']}")
    print("\ntargets: (b) <= 5% of (a), (c) <= 10% of (a)")


if __name__ == "__main__":
    main()
