"""The pipeline end to end on an S3 workspace against a local one, on this machine.

    python bench/object_store.py                      # the standard library's top-level modules (4.5 MB)
    python bench/object_store.py --files 8            # the same bytes in 8 files
    python bench/object_store.py --corpus ./texts --steps 50

Starts moto's S3 server on 127.0.0.1 (the S3 the tests use: an HTTP server in Python, slower
per request than S3 itself and with no network between), then runs `pretrain` (tiny preset) three
ways, each into a fresh workspace: local workspace and corpus; the workspace on S3 (`s3://...`,
its local cache fresh too); the workspace and the corpus on S3. Then it reruns each twice, every
stage cached (what checking a workspace costs): on the same machine, and with an empty local
cache for the S3 ones, as another machine would. An untimed run first starts Prefect's temporary
server. Prints wall seconds and the ratio to the local run, and what the rerun on another machine
copied into its empty cache (the store's directories and fetched ranges: the corpus, when a
cached stage's check fetches its units).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import s3fs

from gptflow.flows.pretrain import pretrain
from gptflow.flows.temporary_server import stop_with_parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_moto() -> subprocess.Popen:
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=stop_with_parent)  # a killed bench leaves no server behind
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("moto's S3 server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)


def _timed_run(corpus: str, workspace: str, steps: int, cache: Path) -> float:
    os.environ["GPTFLOW_CACHE"] = str(cache)
    started = time.perf_counter()
    summary = pretrain(corpus=[corpus], preset="tiny", overrides={"train.max_steps": steps}, workspace=workspace)
    elapsed = time.perf_counter() - started
    print(f"  {workspace[:60]:<60} corpus {corpus[:40]:<40} stages {sorted(set(summary.stages.values()))} "
          f"{elapsed:6.1f} s", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="a local folder (default: the standard library's top-level modules)")
    parser.add_argument("--files", type=int, default=0,
                        help="the default corpus joined into this many files (default: one per module, 168 "
                             "files of 27 KB on average); the same bytes in fewer, larger files")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run (tiny preset)")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    scratch = Path(tempfile.mkdtemp(prefix="gptflow-bench-s3-"))
    server = _start_moto()
    try:
        filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
        filesystem.mkdir("bench")
        corpus = Path(args.corpus) if args.corpus else _stdlib_corpus(scratch / "corpus", args.files)
        files = [path for path in corpus.rglob("*") if path.is_file()]
        filesystem.put([str(path) for path in files],
                       [f"bench/raw/{path.relative_to(corpus).as_posix()}" for path in files])
        print(f"corpus {corpus}: {len(files)} files, {sum(path.stat().st_size for path in files) / 2**20:.1f} MiB; "
              f"S3 at {os.environ['AWS_ENDPOINT_URL']} (moto)", flush=True)
        ways = {
            "local workspace, local corpus": (str(corpus), str(scratch / "local")),
            "S3 workspace, local corpus": (str(corpus), "s3://bench/ws-local-corpus"),
            "S3 workspace, S3 corpus": ("s3://bench/raw/", "s3://bench/ws-s3-corpus"),
        }
        warm_up(str(corpus), scratch)
        first, same_machine, new_machine, copied = {}, {}, {}, {}
        print("first runs (every stage computed):")
        for index, (name, (corpus_spec, workspace)) in enumerate(ways.items()):
            first[name] = _timed_run(corpus_spec, workspace, args.steps, scratch / f"cache-{index}")
        print("reruns on the same machine (every stage cached, the local cache warm):")
        for index, (name, (corpus_spec, workspace)) in enumerate(ways.items()):
            same_machine[name] = _timed_run(corpus_spec, workspace, args.steps, scratch / f"cache-{index}")
        print("reruns on another machine (every stage cached, an empty local cache for the S3 workspaces):")
        for index, (name, (corpus_spec, workspace)) in enumerate(ways.items()):
            new_machine[name] = _timed_run(corpus_spec, workspace, args.steps, scratch / f"cache-new-{index}")
            copied[name] = _copied_bytes(scratch / f"cache-new-{index}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    baseline = "local workspace, local corpus"
    print("\n| way | first run (s) | vs local | rerun, same machine (s) | vs local | rerun, another machine (s) "
          "| vs local | copied there (MiB) |\n|---|---|---|---|---|---|---|---|")
    for name in ways:
        copied_there = "(its own disk)" if name == baseline else f"{copied[name] / 2**20:.2f}"
        print(f"| {name} | {first[name]:.1f} | {first[name] / first[baseline]:.2f}x | {same_machine[name]:.1f} | "
              f"{same_machine[name] / same_machine[baseline]:.2f}x | {new_machine[name]:.1f} | "
              f"{new_machine[name] / new_machine[baseline]:.2f}x | {copied_there} |")


def _copied_bytes(cache: Path) -> int:
    """Bytes of store directories and fetched ranges in the local copies under the cache ``cache``."""
    return sum(path.stat().st_size for folder in ("store", "ranges") for path in cache.glob(f"workspaces/*/{folder}/**/*")
               if path.is_file())


def _stdlib_corpus(folder: Path, files: int) -> Path:
    """The standard library's top-level modules in ``folder``: one file each, or joined in turn into
    ``files`` files."""
    folder.mkdir()
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        for module in modules:
            shutil.copy2(module, folder / module.name)
        return folder
    for index in range(files):
        (folder / f"part-{index:03d}.py").write_text("\n".join(module.read_text() for module in modules[index::files]))
    return folder


def warm_up(corpus: str, scratch: Path) -> None:
    """One untimed run, so that the first timed one does not pay for starting Prefect's temporary
    server and importing what a run imports."""
    pretrain(corpus=[corpus], preset="tiny", overrides={"train.max_steps": 1}, workspace=str(scratch / "warm-up"))


if __name__ == "__main__":
    main()
