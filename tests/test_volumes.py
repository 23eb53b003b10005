"""Split volumes: sizes, the writer's layout and atomicity, coreutils interoperability, reading in
place across part boundaries, and every damaged-copy case named."""
from __future__ import annotations

import os
import random
import subprocess
import threading

import pytest
from conftest import need_binary

from packager.errors import BundleError, UsageError, VolumeError
from packager.formats.volumes import (
    MAX_PARTS,
    FileSource,
    SplitWriter,
    Volumes,
    open_source,
    open_volumes,
    parse_listing,
    parse_size,
    split_file,
)

# ------------------------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text, expected", [
    ("4G", 4 << 30), ("4GiB", 4 << 30), ("4g", 4 << 30), ("4gib", 4 << 30), ("25GB", 25 * 10**9),
    ("700M", 700 << 20), ("700MiB", 700 << 20), ("700MB", 700 * 10**6), ("700m", 700 << 20),
    ("512K", 512 << 10), ("512k", 512 << 10), ("512KB", 512_000), ("1T", 1 << 40), ("1TB", 10**12),
    ("1000000", 1_000_000), ("1000B", 1000), (" 4G ", 4 << 30), ("4 G", 4 << 30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0G", "-1", "-4G", "", "G", "4X", "1.5G", "4Gi", "4iB", "four", "4G4", "4 GB B"])
def test_parse_size_refusals_are_one_usage_line(text):
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)
    assert info.value.exit_code == 2


# -------------------------------------------------------------------------------------------- writing

def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _split(tmp_path, data: bytes, part_size: int, name: str = "b.tar"):
    src = tmp_path / name
    src.write_bytes(data)
    return split_file(src, part_size)


def _sizes(parts):
    return [p.stat().st_size for p in parts]


@pytest.mark.parametrize("total, part_size, expected", [
    (10_000, 3000, [3000, 3000, 3000, 1000]),
    (9000, 3000, [3000, 3000, 3000]),  # an exact multiple: no empty trailing part
    (2999, 3000, [2999]),  # one part is still NAME.000 + NAME.sha256
    (3000, 3000, [3000]),
    (5 * 512 + 7, 700, [700, 700, 700, 467]),  # part size not a multiple of 512
    (300, 1, [1] * 300),  # far smaller than anything in the bundle
])
def test_split_sizes(tmp_path, total, part_size, expected):
    data = _data(total)
    parts = _split(tmp_path, data, part_size)
    assert [p.name for p in parts] == [f"b.tar.{i:03d}" for i in range(len(expected))]
    assert _sizes(parts) == expected
    assert all(size <= part_size for size in _sizes(parts))
    assert b"".join(p.read_bytes() for p in parts) == data
    listing = (tmp_path / "b.tar.sha256").read_text()
    assert listing.splitlines()[0].endswith("  b.tar.000") and len(listing.splitlines()) == len(expected)
    # nothing else left behind: the source, the parts and the listing
    assert sorted(os.listdir(tmp_path)) == sorted(["b.tar", "b.tar.sha256", *(p.name for p in parts)])


def test_coreutils_check_and_cat(tmp_path):
    sha256sum = need_binary("sha256sum")
    data = _data(100_000)
    parts = _split(tmp_path, data, 4096 + 3)
    proc = subprocess.run([sha256sum, "-c", "--strict", "b.tar.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": OK") == len(parts) == 25
    subprocess.run("cat b.tar.0* > joined", shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "joined").read_bytes() == data


def test_streaming_writer_with_many_small_writes(tmp_path):
    data = _data(50_000, seed=1)
    rng = random.Random(2)
    with SplitWriter(tmp_path / "s.tar", 1000) as writer:
        offset = 0
        while offset < len(data):
            step = rng.choice([0, 1, 7, 512, 999, 1000, 1001, 4096])
            assert writer.write(data[offset:offset + step]) == len(data[offset:offset + step])
            offset += step
        # nothing visible before commit, only hidden temporary files
        assert not any(not name.startswith(".") for name in os.listdir(tmp_path))
    assert writer.tell() == len(data) and len(writer.parts) == 50
    with open_volumes(tmp_path / "s.tar.000") as volumes:
        assert volumes.read_at(len(data), 0) == data


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_write_from_mixes_with_write(tmp_path, kernel_copy):
    src = tmp_path / "ckpt"
    payload = _data(20_000, seed=3)
    src.write_bytes(payload)
    fd = os.open(src, os.O_RDONLY)
    try:
        with SplitWriter(tmp_path / "m.tar", 3333) as writer:
            writer._kernel_copy = kernel_copy and writer._kernel_copy
            writer.write(b"header" * 100)
            assert writer.write_from(fd, 100, 15_000) == 15_000
            writer.write(b"trailer")
    finally:
        os.close(fd)
    assert b"".join(p.read_bytes() for p in writer.parts) == b"header" * 100 + payload[100:15_100] + b"trailer"
    assert open_volumes(tmp_path / "m.tar.sha256").diagnose() is None


def test_abort_on_exception_leaves_nothing(tmp_path):
    (tmp_path / "keep").write_bytes(b"x")
    with pytest.raises(RuntimeError):
        with SplitWriter(tmp_path / "a.tar", 100) as writer:
            writer.write(_data(1000))
            raise RuntimeError("bundle writer failed")
    assert os.listdir(tmp_path) == ["keep"]
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_failed_commit_takes_everything_back(tmp_path):
    (tmp_path / "f.tar.sha256").mkdir()  # the listing cannot be renamed onto a non-empty directory
    (tmp_path / "f.tar.sha256" / "x").write_bytes(b"")
    writer = SplitWriter(tmp_path / "f.tar", 100)
    writer.write(_data(1000))
    with pytest.raises(BundleError, match=r"^cannot write the parts of .*f\.tar: "):
        writer.commit()
    assert sorted(os.listdir(tmp_path)) == ["f.tar.sha256"]


def test_failed_source_read_cannot_be_committed(tmp_path):
    with SplitWriter(tmp_path / "r.tar", 100) as writer:
        writer.write(b"x" * 150)
        fd = os.open(tmp_path, os.O_RDONLY)  # a directory: preadv fails with EISDIR
        try:
            with pytest.raises(BundleError, match="cannot read the file being split"):
                writer.write_from(fd, 0, 10)
        finally:
            os.close(fd)
        with pytest.raises(ValueError, match="failed"):
            writer.commit()
    assert os.listdir(tmp_path) == []


def test_empty_split_is_refused(tmp_path):
    with pytest.raises(BundleError, match="nothing was written"):
        SplitWriter(tmp_path / "e.tar", 100).commit()
    assert os.listdir(tmp_path) == []


def test_too_many_parts_refused(tmp_path, monkeypatch):
    (tmp_path / "t.tar").write_bytes(b"x" * (MAX_PARTS + 1))
    with pytest.raises(UsageError, match=f"needs {MAX_PARTS + 1} parts, more than {MAX_PARTS}"):
        split_file(tmp_path / "t.tar", 1)  # known before anything is written
    assert os.listdir(tmp_path) == ["t.tar"]
    monkeypatch.setattr("packager.formats.volumes.MAX_PARTS", 5)  # streaming: found at the 6th part
    writer = SplitWriter(tmp_path / "s.tar", 10)
    with pytest.raises(UsageError, match="more than 5 parts"):
        writer.write(b"x" * 51)
    writer.abort()
    assert os.listdir(tmp_path) == ["t.tar"]


def test_resplit_replaces_stale_parts(tmp_path):
    data = _data(10_000)
    _split(tmp_path, data, 1000)
    assert (tmp_path / "b.tar.009").exists()
    parts = split_file(tmp_path / "b.tar", 4000)
    assert len(parts) == 3 and not (tmp_path / "b.tar.003").exists()
    assert open_volumes(parts[0]).diagnose() is None


def test_split_into_other_name(tmp_path):
    (tmp_path / "in.tar").write_bytes(_data(5000))
    out = tmp_path / "media"
    out.mkdir()
    parts = split_file(tmp_path / "in.tar", 2048, output=out / "site-update.tar")
    assert [p.name for p in parts] == ["site-update.tar.000", "site-update.tar.001", "site-update.tar.002"]


def test_bad_part_size_and_name(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError):
            SplitWriter(tmp_path / "x.tar", bad)
    with pytest.raises(UsageError, match="newline"):
        SplitWriter(tmp_path / "x\n.tar", 10)


# -------------------------------------------------------------------------------------------- reading

@pytest.fixture
def seven(tmp_path):
    """A 7-part split of 6.5 parts' worth of random bytes, and those bytes."""
    data = _data(6500, seed=7)
    _split(tmp_path, data, 1000)
    return tmp_path, data


def test_reads_across_boundaries_equal_slices(seven):
    tmp_path, data = seven
    rng = random.Random(1234)
    with open_source(tmp_path / "b.tar.000") as volumes:
        assert isinstance(volumes, Volumes)
        assert (volumes.size, volumes.name, len(volumes.parts), volumes.part_size) == (6500, "b.tar", 7, 1000)
        for _ in range(2000):
            offset = rng.randrange(0, 6600)
            n = rng.choice([0, 1, 2, 511, 999, 1000, 1001, 2500, 7000, rng.randrange(0, 7000)])
            assert volumes.read_at(n, offset) == data[offset:offset + n], (n, offset)
            buf = bytearray(n)
            got = volumes.readinto_at(memoryview(buf), offset)
            assert bytes(buf[:got]) == data[offset:offset + n]
        # exactly at the boundaries
        for boundary in range(0, 6501, 1000):
            assert volumes.read_at(2, boundary - 1 if boundary else 0) == data[max(0, boundary - 1):][:2]


def test_reads_from_many_threads(seven):
    tmp_path, data = seven
    errors = []
    with open_volumes(tmp_path / "b.tar.sha256") as volumes:
        def worker(seed):
            rng = random.Random(seed)
            for _ in range(300):
                offset, n = rng.randrange(6500), rng.randrange(3000)
                if volumes.read_at(n, offset) != data[offset:offset + n]:
                    errors.append((offset, n))
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_file_source_same_interface(tmp_path):
    data = _data(5000)
    (tmp_path / "b.tar").write_bytes(data)
    with open_source(tmp_path / "b.tar") as source:
        assert isinstance(source, FileSource)
        assert (source.size, source.name, source.parts) == (5000, "b.tar", [tmp_path / "b.tar"])
        assert source.read_at(100, 4950) == data[4950:]
        assert source.read_at(10, 6000) == b""
        assert source.diagnose() is None
        source.check_all()
    with pytest.raises(ValueError, match="closed"):
        source.read_at(1, 0)


def test_open_source_picks_the_kind(seven):
    tmp_path, data = seven
    for name in ("b.tar.000", "b.tar.sha256", "b.tar"):  # b.tar exists as the source: a single file
        with open_source(tmp_path / name) as source:
            assert source.read_at(6500, 0) == data
    (tmp_path / "b.tar").unlink()
    with open_source(tmp_path / "b.tar") as source:  # only the split exists: NAME finds NAME.sha256
        assert isinstance(source, Volumes)
    with pytest.raises(VolumeError, match=r"b\.tar\.003 is part 4 of a split bundle: give the first part, b\.tar\.000"):
        open_source(tmp_path / "b.tar.003")
    (tmp_path / "b.tar.sha256").unlink()
    with pytest.raises(VolumeError, match=r"^b\.tar\.sha256 is missing beside b\.tar\.000"):
        open_source(tmp_path / "b.tar.000")
    with pytest.raises(BundleError, match="no such bundle"):
        open_source(tmp_path / "nothing.tar")


def test_single_part_without_listing_is_a_plain_file(tmp_path):
    (tmp_path / "odd.000").write_bytes(b"abc")
    assert isinstance(open_source(tmp_path / "odd.000"), FileSource)


@pytest.mark.timeout(20)  # a regression would block in open(): fail, don't hang the suite
def test_fifo_refused_without_hanging(tmp_path):
    fifo = tmp_path / "b.tar"
    os.mkfifo(fifo)
    for opener in (open_source, FileSource, lambda p: split_file(p, 100)):
        with pytest.raises(BundleError, match="is a FIFO"):
            opener(fifo)
    with pytest.raises(BundleError, match="is a directory"):
        open_source(tmp_path)
    with pytest.raises(BundleError, match="is a character device"):
        open_source("/dev/null")
    # a FIFO in place of a part or of the listing
    data = _data(3000)
    (tmp_path / "c.tar").write_bytes(data)
    split_file(tmp_path / "c.tar", 1000)
    (tmp_path / "c.tar.001").unlink()
    os.mkfifo(tmp_path / "c.tar.001")
    with pytest.raises(VolumeError, match=r"part 2 of 3, c\.tar\.001, is a FIFO"):
        open_source(tmp_path / "c.tar.000")


# --------------------------------------------------------------------------------------- damaged copies

def _open_error(path) -> str:
    with pytest.raises(VolumeError) as info:
        open_volumes(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_part_named(seven):
    tmp_path, _ = seven
    (tmp_path / "b.tar.002").unlink()
    assert _open_error(tmp_path / "b.tar.000") == "part 3 of 7, b.tar.002, is missing: copy it again"


def test_missing_last_part_named(seven):
    tmp_path, _ = seven
    (tmp_path / "b.tar.006").unlink()
    assert _open_error(tmp_path / "b.tar.000") == "part 7 of 7, b.tar.006, is missing: copy it again"


@pytest.mark.parametrize("index, keep, expected", [
    (2, 600, "part 3 of 7, b.tar.002, is short (600 bytes, expected 1000): copy it again"),
    (0, 10, "part 1 of 7, b.tar.000, is short (10 bytes, expected 1000): copy it again"),
    (6, 0, "part 7 of 7, b.tar.006, is short (0 bytes, expected at least 1): copy it again"),
])
def test_truncated_part_named(seven, index, keep, expected):
    tmp_path, _ = seven
    os.truncate(tmp_path / f"b.tar.{index:03d}", keep)
    assert _open_error(tmp_path / "b.tar.sha256") == expected


def test_truncated_last_part_found_by_diagnose(seven):
    tmp_path, _ = seven
    os.truncate(tmp_path / "b.tar.006", 400)  # still a plausible size for a last part
    with open_volumes(tmp_path / "b.tar.000") as volumes:
        assert volumes.size == 6400
        assert volumes.diagnose() == "part 7 of 7, b.tar.006, is corrupt: copy it again"


def test_grown_part_named(seven):
    tmp_path, _ = seven
    with open(tmp_path / "b.tar.006", "ab") as f:
        f.write(b"x" * 600)
    assert _open_error(tmp_path / "b.tar.000") == \
        "part 7 of 7, b.tar.006, is too large (1100 bytes, expected at most 1000): copy it again"


def test_corrupt_part_named_by_diagnose_and_check_all(seven):
    tmp_path, data = seven
    part = tmp_path / "b.tar.004"
    blob = bytearray(part.read_bytes())
    blob[500] ^= 0x01
    part.write_bytes(bytes(blob))
    with open_volumes(tmp_path / "b.tar.000") as volumes:  # opening does not read the data
        assert volumes.read_at(10, 0) == data[:10]
        assert volumes.diagnose() == "part 5 of 7, b.tar.004, is corrupt: copy it again"
        with pytest.raises(VolumeError, match=r"^part 5 of 7, b\.tar\.004, is corrupt: copy it again$"):
            volumes.check_all()


def test_swapped_parts_named_both(seven):
    tmp_path, _ = seven
    a, b = tmp_path / "b.tar.001", tmp_path / "b.tar.003"
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    with open_volumes(tmp_path / "b.tar.000") as volumes:
        assert volumes.diagnose() == ("part 2 of 7, b.tar.001, is corrupt: it holds the bytes of part 4 of 7, b.tar.003 "
                                      "(parts swapped or renamed): copy both again")


def test_extra_part_named(seven):
    tmp_path, _ = seven
    (tmp_path / "b.tar.007").write_bytes(b"left over from another split")
    assert _open_error(tmp_path / "b.tar.000").startswith("b.tar.007 is not listed in b.tar.sha256")


def test_clean_copy_diagnoses_none(seven):
    tmp_path, _ = seven
    with open_volumes(tmp_path / "b.tar.000") as volumes:
        assert volumes.diagnose() is None
        volumes.check_all()


def test_part_changed_after_open(seven):
    tmp_path, _ = seven
    with open_volumes(tmp_path / "b.tar.000") as volumes:
        os.truncate(tmp_path / "b.tar.003", 10)
        with pytest.raises(VolumeError, match=r"part 4 of 7, b\.tar\.003, changed while"):
            volumes.read_at(100, 3000)
        assert "b.tar.003" in volumes.diagnose()


@pytest.mark.parametrize("text, message", [
    ("", "lists no parts"),
    ("zz  b.tar.000\n", "line 1 is not"),
    (f"{'a' * 64}  b.tar.001\n", "lists b.tar.001, expected b.tar.000"),
    (f"{'a' * 64}  b.tar.000\n{'b' * 64}  b.tar.002\n", "line 2 lists b.tar.002, expected b.tar.001"),
    (f"{'a' * 64}  b.tar.000\n{'b' * 64}  b.tar.000\n", "line 2 lists b.tar.000, expected b.tar.001"),
    (f"{'a' * 64}  b.tar.000\n{'b' * 64}  c.tar.001\n", "line 2 lists c.tar.001, expected b.tar.001"),
    (f"{'a' * 64}  ../b.tar.000\n", "not a part file name"),
    (f"{'a' * 64}  b.tar\n", "not a part file name"),
])
def test_listing_refusals(text, message):
    with pytest.raises(VolumeError, match=message.replace(".", r"\.")):
        parse_listing(text, "b.tar.sha256")


def test_listing_accepts_binary_marker_and_crlf():
    listing = parse_listing(f"{'A' * 64} *b.tar.000\r\n{'b' * 64}  b.tar.001\r\n", "x")
    assert listing.name == "b.tar" and listing.digests == ("a" * 64, "b" * 64)


def test_renamed_listing_refused(seven):
    tmp_path, _ = seven
    (tmp_path / "b.tar.sha256").rename(tmp_path / "other.sha256")
    assert "lists the parts of b.tar" in _open_error(tmp_path / "other.sha256")


def test_a_failure_in_parts_that_all_match_names_the_part_it_shares(seven):
    """Every part matches the listing (a foreign part's line was rewritten), yet reading failed: the part blamed is
    the one every failed span shares, else the range; without a span, the part the latest read was in."""
    tmp_path, _ = seven
    with open_volumes(tmp_path / "b.tar.000") as volumes:
        assert volumes.diagnose() is None  # nothing read, nothing failed: nothing to say
        one = volumes.diagnose([(1500, 3500), (3200, 5000)])
        assert one.startswith("part 4 of 7, b.tar.003, does not belong to this bundle: the archive breaks inside, "
                              "although it matches its line in b.tar.sha256")
        several = volumes.diagnose([(1500, 3500)])
        assert several.startswith("one of parts 2..4 of 7 (b.tar.001 .. b.tar.003), does not belong to this bundle")
        volumes.read_at(512, 4800)
        assert volumes.diagnose().startswith("part 6 of 7, b.tar.005, does not belong")
        volumes.check_all()  # the deep check of the copy itself still passes: every part matches


def test_a_lone_part_says_what_is_missing_when_reading_fails(tmp_path):
    (tmp_path / "odd.000").write_bytes(b"abc")
    with open_source(tmp_path / "odd.000") as source:
        assert source.diagnose() == ("odd.000 is the first part of a split bundle, not a whole bundle: the other parts "
                                     f"(odd.001, odd.002, ...) and odd.sha256 are missing beside it: copy them all into "
                                     f"{tmp_path}")
    (tmp_path / "whole.tar").write_bytes(b"abc")
    with open_source(tmp_path / "whole.tar") as source:
        assert source.diagnose() is None
