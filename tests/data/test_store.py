"""The store on a disk that runs out of space: nothing partial is left, and the error names what was
being written, the space left there and what to do."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from gptflow.data.disk_space import OutOfSpaceError, out_of_space_errno, out_of_space_error


def _run_limited(code: str, limit_bytes: int, file_size_limit) -> str:
    """Run ``code`` in a child whose files cannot grow past ``limit_bytes``; its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            preexec_fn=file_size_limit(limit_bytes))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_directory_that_runs_out_of_space_leaves_nothing_and_the_error_names_it(tmp_path, file_size_limit):
    final = tmp_path / "store" / "tokens" / "key"
    code = f"""
from pathlib import Path
from gptflow.data.commits import atomic_directory
from gptflow.data.disk_space import OutOfSpaceError
try:
    with atomic_directory(Path({str(final)!r})) as tmp:
        (tmp / "unit.json").write_text("{{}}")
        (tmp / "train.arrow").write_bytes(bytes(1 << 20))
except OutOfSpaceError as error:
    print(error)
"""
    message = _run_limited(code, 64 * 1024, file_size_limit)
    assert message.startswith(f"out of space writing {final}: a file reached the file size limit (ulimit -f)")
    assert "free on the filesystem at /" in message
    assert message.rstrip().endswith("then rerun the same command: completed stages are reused.")
    assert list(final.parent.iterdir()) == []  # neither the temporary directory nor a partial commit


def test_a_file_replaced_atomically_keeps_its_old_content_when_the_new_one_does_not_fit(tmp_path, file_size_limit):
    manifest, tokenizer, source = tmp_path / "manifest.json", tmp_path / "tokenizer.json", tmp_path / "source.json"
    manifest.write_text('{"old": true}')
    source.write_bytes(bytes(1 << 20))
    code = f"""
from pathlib import Path
from gptflow.data.commits import copy_file_atomic, write_json_atomic
from gptflow.data.disk_space import OutOfSpaceError
for write in (lambda: write_json_atomic(Path({str(manifest)!r}), {{"new": "x" * (1 << 20)}}),
              lambda: copy_file_atomic(Path({str(source)!r}), Path({str(tokenizer)!r}))):
    try:
        write()
    except OutOfSpaceError as error:
        print(error)
"""
    messages = _run_limited(code, 64 * 1024, file_size_limit).splitlines()
    written = [f"out of space writing {path}" for path in (manifest, tokenizer)]
    assert [message.split(":")[0] for message in messages] == written
    assert json.loads(manifest.read_text()) == {"old": True}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json", "source.json"]


def _raised_while_handling(cause: BaseException, error: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            raise error  # as torch.save does when the write to its file fails
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(("error", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
    # safetensors' (and tokenizers') own error, with Rust's io::Error text
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (Exception("database or disk is full"), errno.ENOSPC),  # SQLite: the MLflow store
    (_raised_while_handling(OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos")),
     errno.ENOSPC),
    (OutOfSpaceError("out of space writing x", errno.EDQUOT), errno.EDQUOT),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (Exception("Error while deserializing: I/O error: No such file or directory (os error 2)"), None),
    (ValueError("bad input"), None),
])
def test_running_out_of_space_is_told_apart_from_other_errors(error, code):
    assert out_of_space_errno(error) == code


def test_the_error_says_how_to_recover_for_a_full_disk(tmp_path):
    error = out_of_space_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "not-yet-created")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith(f"out of space writing {tmp_path / 'not-yet-created'}: the disk is full (")
    assert " or point --workspace / GPTFLOW_HOME elsewhere, then rerun the same command" in str(error)
    assert out_of_space_error(ValueError("bad input"), tmp_path) is None
