"""The one manifest entry format (size + sha256) that data, CF runs and checkpoints share, and the older
formats still read."""

import hashlib

from cora.fileio import file_entry, file_problem


def test_an_entry_catches_a_missing_truncated_or_altered_file_in_every_format(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abcdef" * 100)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    entry = file_entry(f)
    assert entry == {"size": 600, "sha256": digest} == file_entry(f.read_bytes())
    old_data, old_cf = {"bytes": 600, "sha256": digest}, digest          # dataset.json v1, cf.json v1
    for e in (entry, old_data, old_cf):
        assert file_problem(f, e) is None
    f.write_bytes(b"abcdef" * 99)                                             # truncated
    assert "has 594 bytes where the manifest says 600" in file_problem(f, entry)
    assert "has 594 bytes" in file_problem(f, old_data)
    assert "does not match the sha256" in file_problem(f, old_cf)            # no size recorded: the hash tells
    f.write_bytes(b"abcdeF" + b"abcdef" * 99)                                 # same size, altered
    assert all("does not match the sha256" in file_problem(f, e) for e in (entry, old_data, old_cf))
    f.unlink()
    assert file_problem(f, entry) == "is missing"
