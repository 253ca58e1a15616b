"""The one manifest entry format (size + a named digest) that data, CF runs and checkpoints share, and the
older formats still read."""

import hashlib

import xxhash

from cora.fileio import bytes_problem, file_entry, file_problem


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


def test_an_xxh3_entry_is_checked_with_xxh3_and_an_unknown_digest_is_named():
    """Checkpoints' tensor files carry xxh3-128 (cheap enough to hash while the ranks train): the entry names its
    hash, which is the one checked; a digest this version does not know is a problem naming it, not a pass (so a
    checkpoint written by a newer version is skipped with a warning, like a damaged one, not crashed into)."""
    data = b"partition" * 1000
    entry = file_entry(data, "xxh3_128")
    assert entry == {"size": 9000, "xxh3_128": xxhash.xxh3_128(data).hexdigest()} and len(entry["xxh3_128"]) == 32
    assert bytes_problem(data, entry) is None
    assert bytes_problem(data, {"size": 9000, "sha256": hashlib.sha256(data).hexdigest()}) is None
    altered = b"Partition" + data[9:]
    assert bytes_problem(altered, entry) == "does not match the xxh3_128 in the manifest (changed or corrupted)"
    assert "has 8999 bytes where the manifest says 9000" in bytes_problem(data[:-1], entry)
    assert bytes_problem(data, {"size": 9000, "blake3": "00"}) == (
        "has a manifest entry with no digest this version reads (sha256, xxh3_128): ['blake3', 'size']; "
        "read it with the version that wrote it")
