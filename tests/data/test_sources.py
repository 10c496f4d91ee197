from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptflow.data.errors import CorpusError
from gptflow.data.sources import (
    BUILTIN_CORPUS,
    SKIP_BROKEN_SYMLINK,
    SKIP_HIDDEN,
    SKIP_NOT_REGULAR,
    SKIP_PERMISSION_DENIED,
    SKIP_READ_ERROR,
    SKIP_UNLISTABLE_FOLDER,
    SKIP_UNSUPPORTED,
    builtin_corpus_root,
    detect_format,
    resolve_sources,
)

needs_permissions = pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
folder_or_glob = pytest.mark.parametrize("as_spec", [str, lambda folder: str(folder / "*")], ids=["folder", "glob"])


@pytest.fixture
def mixed_folder(write_corpus) -> Path:
    return write_corpus({
        "a.txt": "plain text",
        "notes.md": "# notes",
        "sub/b.jsonl.gz": b"",
        "sub/deeper/c.parquet": b"",
        "sub/d.csv.zst": b"",
        "report.docx": b"PK",
        ".hidden.txt": "secret",
        ".git/config": "[core]",
    })


def test_folder_is_searched_recursively_sorted_with_formats_and_compression(mixed_folder):
    resolution = resolve_sources([str(mixed_folder)])
    found = [(source.path.relative_to(mixed_folder).as_posix(), source.format, source.compression)
             for source in resolution.files]
    assert found == [
        ("a.txt", "text", None),
        ("notes.md", "text", None),
        ("sub/b.jsonl.gz", "jsonl", "gzip"),
        ("sub/d.csv.zst", "csv", "zstd"),
        ("sub/deeper/c.parquet", "parquet", None),
    ]
    assert all(source.path.is_absolute() for source in resolution.files)


def test_unsupported_and_hidden_files_inside_a_folder_are_counted_not_fatal(mixed_folder):
    skipped = resolve_sources([str(mixed_folder)]).skipped
    assert skipped.counts == {SKIP_UNSUPPORTED: 1, SKIP_HIDDEN: 2}
    assert skipped.examples[SKIP_UNSUPPORTED] == [str(mixed_folder / "report.docx")]
    assert sorted(skipped.examples[SKIP_HIDDEN]) == [str(mixed_folder / ".git"), str(mixed_folder / ".hidden.txt")]


def test_file_named_twice_by_path_folder_and_glob_is_listed_once(mixed_folder):
    resolution = resolve_sources([
        str(mixed_folder / "a.txt"),
        str(mixed_folder),
        str(mixed_folder / "**" / "*.txt"),
        os.path.relpath(mixed_folder / "a.txt"),
    ])
    paths = [source.path for source in resolution.files]
    assert len(paths) == len(set(paths)) == 5


def test_recursive_glob_matches_files_in_subfolders_only_of_its_pattern(mixed_folder):
    resolution = resolve_sources([str(mixed_folder / "**" / "*.parquet"), str(mixed_folder / "*.md")])
    assert [source.path.name for source in resolution.files] == ["notes.md", "c.parquet"]


def test_missing_path_error_names_the_path_its_resolution_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError) as raised:
        resolve_sources(["no/such/texts"])
    message = str(raised.value)
    assert "'no/such/texts' does not exist" in message
    assert str(tmp_path / "no/such/texts") in message
    assert "omit --corpus" in message


def test_explicitly_named_file_of_unknown_type_is_an_error_listing_supported_extensions(write_corpus):
    folder = write_corpus({"slides.pptx": b"PK"})
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(folder / "slides.pptx")])
    message = str(raised.value)
    assert "slides.pptx" in message and "unsupported type" in message
    for extension in (".txt", ".jsonl", ".parquet", ".csv", ".gz", ".zst"):
        assert extension in message


def test_glob_matching_nothing_is_an_error(write_corpus):
    folder = write_corpus({"a.txt": "x"})
    with pytest.raises(CorpusError, match=r"matches no files"):
        resolve_sources([str(folder / "*.jsonl")])


def test_folder_without_any_readable_file_is_an_error_that_says_what_was_skipped(write_corpus):
    folder = write_corpus({"image.png": b"\x89PNG", ".env": "KEY=1"})
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(folder)])
    assert "No readable files" in str(raised.value)
    assert f"{SKIP_UNSUPPORTED} ×1" in str(raised.value) and "image.png" in str(raised.value)


@pytest.mark.parametrize(("name", "expected"), [
    ("a.TXT", ("text", None)),
    ("code.py", ("text", None)),
    ("guide.rst", ("text", None)),
    ("v1.2.jsonl.gz", ("jsonl", "gzip")),
    ("rows.json.zst", ("json", "zstd")),
    ("table.parquet.gz", None),  # parquet needs random access: no outer compression
    ("archive.tar.gz", None),
    ("README", None),
])
def test_format_and_compression_come_from_the_file_name(name, expected):
    assert detect_format(Path(name)) == expected


def test_builtin_corpus_is_the_standard_library_source_without_tests_or_site_packages():
    files = resolve_sources([BUILTIN_CORPUS]).files
    root = builtin_corpus_root()
    relative = [source.path.relative_to(root) for source in files]
    assert 500 < len(files) < 1500
    assert all(source.format == "text" and source.path.suffix == ".py" for source in files)
    assert not [path for path in relative if {"test", "tests", "idle_test", "site-packages"} & set(path.parts)]
    assert Path("json/decoder.py") in relative
    assert 5e6 < sum(source.path.stat().st_size for source in files) < 30e6


def test_fingerprint_inputs_change_when_a_file_changes(write_corpus):
    folder = write_corpus({"a.txt": "one", "b.txt": "two"})
    before = resolve_sources([str(folder)]).fingerprint_inputs()
    (folder / "b.txt").write_text("two, edited")
    after = resolve_sources([str(folder)]).fingerprint_inputs()
    assert before[0] == after[0] and before[1] != after[1]


@needs_permissions
def test_unreadable_file_inside_a_folder_is_skipped_and_counted(write_corpus):
    folder = write_corpus({"a.txt": "kept", "locked.txt": "secret"})
    (folder / "locked.txt").chmod(0)
    resolution = resolve_sources([str(folder)])
    assert [source.path.name for source in resolution.files] == ["a.txt"]
    assert resolution.skipped.examples == {SKIP_PERMISSION_DENIED: [str(folder / "locked.txt")]}


@needs_permissions
def test_unreadable_file_named_explicitly_is_an_error_naming_it_and_the_fix(write_corpus):
    folder = write_corpus({"locked.txt": "secret"})
    (folder / "locked.txt").chmod(0)
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(folder / "locked.txt")])
    message = str(raised.value)
    assert f"'{folder / 'locked.txt'}' cannot be read (permission denied)" in message
    assert "chmod +r" in message and "leave it out of --corpus" in message


@needs_permissions
def test_unlistable_subfolder_is_skipped_and_counted(write_corpus):
    folder = write_corpus({"a.txt": "kept", "private/b.txt": "secret"})
    (folder / "private").chmod(0)
    resolution = resolve_sources([str(folder)])
    assert [source.path.name for source in resolution.files] == ["a.txt"]
    assert resolution.skipped.examples == {SKIP_UNLISTABLE_FOLDER: [str(folder / "private")]}


@needs_permissions
def test_unlistable_folder_named_explicitly_is_an_error_naming_it_and_the_fix(write_corpus):
    folder = write_corpus({"private/b.txt": "secret"})
    (folder / "private").chmod(0)
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(folder / "private")])
    message = str(raised.value)
    assert f"'{folder / 'private'}' cannot be listed (permission denied)" in message
    assert "chmod +rx" in message


def test_symlinked_folders_are_followed_each_real_folder_once(write_corpus, tmp_path):
    folder = write_corpus({"a.txt": "top", "shared/b.txt": "shared"})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("linked in")
    os.symlink(tmp_path / "elsewhere", folder / "linked")
    os.symlink(folder / "shared", folder / "shared-again")
    os.symlink(folder, folder / "shared" / "back-to-top")  # a loop
    resolution = resolve_sources([str(folder)])
    assert [source.path.relative_to(tmp_path).as_posix() for source in resolution.files] == [
        "corpus/a.txt", "corpus/shared/b.txt", "elsewhere/c.txt",
    ]
    assert resolution.skipped.total == 0


@folder_or_glob
def test_symlinked_file_is_read_at_its_target_once_with_the_format_of_its_name(write_corpus, tmp_path, as_spec):
    folder = write_corpus({"a.txt": "plain text"})
    blob = tmp_path / "blobs" / "3f9a1c0d"  # content-addressed, as in the Hugging Face cache
    blob.parent.mkdir()
    blob.write_text('{"text": "a record"}\n')
    os.symlink(folder / "a.txt", folder / "latest.txt")
    os.symlink(blob, folder / "records.jsonl")
    files = resolve_sources([as_spec(folder)]).files
    assert [(source.path, source.format) for source in files] == [(blob, "jsonl"), (folder / "a.txt", "text")]


@folder_or_glob
def test_broken_and_looping_symlinks_are_skipped_and_counted_as_such(write_corpus, as_spec):
    folder = write_corpus({"a.txt": "kept"})
    os.symlink(folder / "gone.txt", folder / "dangling.txt")
    os.symlink(folder / "self.txt", folder / "self.txt")
    os.symlink(folder / "ping.txt", folder / "pong.txt")
    os.symlink(folder / "pong.txt", folder / "ping.txt")
    resolution = resolve_sources([as_spec(folder)])
    assert [source.path.name for source in resolution.files] == ["a.txt"]
    assert resolution.skipped.counts == {SKIP_BROKEN_SYMLINK: 4}
    assert str(folder / "dangling.txt") in resolution.skipped.examples[SKIP_BROKEN_SYMLINK]


def test_broken_symlink_named_explicitly_is_an_error_saying_so(tmp_path):
    os.symlink(tmp_path / "gone.txt", tmp_path / "dangling.txt")
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(tmp_path / "dangling.txt")])
    message = str(raised.value)
    assert f"'{tmp_path / 'dangling.txt'}' is a symlink whose target is missing" in message
    assert "Fix the link" in message


@folder_or_glob
def test_pipe_is_skipped_and_counted_never_opened(write_corpus, as_spec):
    folder = write_corpus({"a.txt": "kept"})
    os.mkfifo(folder / "stream.jsonl")  # opening it would wait for a writer forever
    resolution = resolve_sources([as_spec(folder)])
    assert [source.path.name for source in resolution.files] == ["a.txt"]
    assert resolution.skipped.examples == {SKIP_NOT_REGULAR: [str(folder / "stream.jsonl")]}


def test_pipe_named_explicitly_is_an_error_naming_it_and_the_fix(tmp_path):
    os.mkfifo(tmp_path / "stream.jsonl")
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(tmp_path / "stream.jsonl")])
    message = str(raised.value)
    assert f"'{tmp_path / 'stream.jsonl'}' is a pipe, socket or device" in message
    assert "Save its contents to a file" in message


# /proc/self/mem lists as a regular file and opens, but reading offset 0 (never mapped) fails with
# EIO for any user, root included: as a failing disk or a stale network mount does.
def _eio_file(folder: Path, name: str) -> Path:
    (folder / name).symlink_to("/proc/self/mem")
    return folder / name


@folder_or_glob
def test_a_file_whose_read_fails_with_an_io_error_is_skipped_and_counted(write_corpus, as_spec):
    folder = write_corpus({"a.txt": "kept"})
    _eio_file(folder, "failing.txt")
    resolution = resolve_sources([as_spec(folder)])
    assert [source.path.name for source in resolution.files] == ["a.txt"]
    assert resolution.skipped.examples == {SKIP_READ_ERROR: [str(folder / "failing.txt")]}


def test_a_file_whose_read_fails_named_explicitly_is_an_error_naming_it_and_the_fix(tmp_path):
    failing = _eio_file(tmp_path, "failing.txt")
    with pytest.raises(CorpusError) as raised:
        resolve_sources([str(failing)])
    message = str(raised.value)
    assert f"'{failing}' cannot be read: reading it fails with an I/O error" in message
    assert "leave it out of --corpus" in message and "\n" not in message
