"""The site inventory: round trips, determinism, every refusal of a malformed or hostile SITE.json."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from packager.errors import BundleError
from packager.formats.inventory import (
    FORMAT,
    Checkpoint,
    InstalledManifest,
    Inventory,
    Versions,
    current_versions,
    encode,
    make_inventory,
    parse,
)

A, B, C = "a" * 64, "b" * 64, "0123456789abcdef" * 4
VERSIONS = Versions(tvpack="0.1.0", torch="2.14.1", torchvision="0.29.1", python="3.11.7")


def _inventory(**changes) -> Inventory:
    fields = dict(versions=VERSIONS, torch_home="/srv/torch",
                  checkpoints=(Checkpoint("vit_b_16-c867db91.pth", 346_000_000, B),
                               Checkpoint("resnet50-11ad3fa6.pth", 102_540_417, A)),
                  manifests=(InstalledManifest("ffff000011112222", ("ViT_B_16_Weights.IMAGENET1K_V1",)),
                             InstalledManifest("0000aaaa1111bbbb", ("ResNet50_Weights.IMAGENET1K_V2",
                                                                    "AlexNet_Weights.IMAGENET1K_V1"))))
    fields.update(changes)
    return Inventory(**fields)


def _doc(**changes) -> dict:
    doc = json.loads(encode(_inventory()))
    doc.update(changes)
    return doc


def _refusal(doc_or_bytes) -> str:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    with pytest.raises(BundleError) as info:
        parse(data, "SITE.json")
    message = str(info.value)
    assert message.startswith("SITE.json: ") and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------- round trips

def test_round_trip_and_canonical_order():
    inv = _inventory()
    data = encode(inv)
    assert parse(data, "SITE.json") == inv
    assert [c.file for c in inv.checkpoints] == ["resnet50-11ad3fa6.pth", "vit_b_16-c867db91.pth"]
    assert [m.id for m in inv.manifests] == ["0000aaaa1111bbbb", "ffff000011112222"]
    assert inv.manifests[0].weights == ("AlexNet_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2")
    # deterministic: the same holdings in another order give the same bytes
    shuffled = _inventory(checkpoints=tuple(reversed(inv.checkpoints)), manifests=tuple(reversed(inv.manifests)))
    assert encode(shuffled) == data
    doc = json.loads(data)
    assert doc["format"] == FORMAT and doc["format_version"] == 1 and "created" not in doc
    # readable: one checkpoint per line
    assert sum(1 for line in data.decode().splitlines() if '"file"' in line) == 2


def test_created_round_trip():
    inv = _inventory(created="2026-11-25T16:00:00+00:00")
    assert parse(encode(inv)).created == "2026-11-25T16:00:00+00:00"
    assert parse(encode(_inventory(created="2026-11-25T16:00:00Z"))).created.endswith("Z")


def test_empty_site_and_unknown_versions():
    inv = Inventory()
    assert parse(encode(inv)) == inv
    assert not inv.has("resnet50-11ad3fa6.pth", A) and inv.total_size == 0


def test_has_and_checkpoint():
    inv = _inventory()
    assert inv.has("resnet50-11ad3fa6.pth", A)
    assert not inv.has("resnet50-11ad3fa6.pth", B)  # same name, other bytes: not held
    assert not inv.has("alexnet-owt-7be5be79.pth", A)
    assert inv.checkpoint("resnet50-11ad3fa6.pth").size == 102_540_417
    assert inv.checkpoint("nope.pth") is None
    assert inv.total_size == 102_540_417 + 346_000_000


def test_make_inventory_reads_versions_here_without_torch(tmp_path):
    inv = make_inventory([("x-12345678.pth", 3, A)], [("0000aaaa1111bbbb", ["X.Y"])], torch_home=tmp_path)
    assert inv.torch_home == str(tmp_path) and inv.versions.python.count(".") == 2
    code = ("import sys; from packager.formats.inventory import current_versions; v = current_versions(); "
            "assert v.torch and v.torchvision and v.tvpack, v; assert 'torch' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip() == "ok", proc.stderr
    assert current_versions().torch is not None


# --------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("bad_file", ["../evil.pth", "a/b.pth", "..", ".", "", ".hidden.pth", "a\\b.pth", "a\x00b",
                                      "line\nbreak.pth", "x" * 256, 5, None])
def test_unsafe_file_names_refused(bad_file):
    doc = _doc(checkpoints=[{"file": bad_file, "size": 1, "sha256": A}])
    assert "checkpoint" in _refusal(doc) or "file" in _refusal(doc)


@pytest.mark.parametrize("size", [-1, 1.5, "10", True, None, [1]])
def test_bad_sizes_refused(size):
    assert "size" in _refusal(_doc(checkpoints=[{"file": "r.pth", "size": size, "sha256": A}]))


@pytest.mark.parametrize("digest", ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "sha256:" + "a" * 64, 7, None])
def test_bad_digests_refused(digest):
    assert "sha256" in _refusal(_doc(checkpoints=[{"file": "r.pth", "size": 1, "sha256": digest}]))


def test_duplicates_refused():
    entry = {"file": "r.pth", "size": 1, "sha256": A}
    assert "listed twice" in _refusal(_doc(checkpoints=[entry, {**entry, "sha256": B}]))
    man = {"id": "0000aaaa1111bbbb", "weights": []}
    assert "listed twice" in _refusal(_doc(manifests=[man, man]))
    assert "duplicate key 'format'" in _refusal(b'{"format": "x", "format": "tvpack-inventory"}')
    with pytest.raises(BundleError, match="listed twice"):
        Inventory(checkpoints=(Checkpoint("r.pth", 1, A), Checkpoint("r.pth", 1, A)))


@pytest.mark.parametrize("change, words", [
    ({"format": "tvpack-lock"}, "not a tvpack inventory"),
    ({"format_version": 2}, "format_version 2 is not supported"),
    ({"format_version": "1"}, "not an integer"),
    ({"format_version": True}, "not an integer"),
    ({"versions": ["2.14"]}, "versions is an array, not an object"),
    ({"versions": {"torch": 2.14}}, "versions.torch is float"),
    ({"versions": {"jax": "0.4"}}, "unknown key 'jax'"),
    ({"checkpoints": {}}, "checkpoints is an object, not an array"),
    ({"checkpoints": ["r.pth"]}, "checkpoints[0] is a string, not an object"),
    ({"checkpoints": [{"file": "r.pth", "size": 1}]}, "checkpoints[0] lacks sha256"),
    ({"checkpoints": [{"file": "r.pth", "size": 1, "sha256": A, "url": "x"}]}, "unknown key 'url'"),
    ({"manifests": [{"id": "xyz", "weights": []}]}, "manifest id 'xyz'"),
    ({"manifests": [{"id": "0000aaaa1111bbbb", "weights": "X.Y"}]}, "weights is a string, not an array"),
    ({"manifests": [{"id": "0000aaaa1111bbbb", "weights": [3]}]}, "lists weights 3"),
    ({"manifests": [{"id": "0000aaaa1111bbbb", "weights": [["X"]]}]}, "lists weights ['X']"),
    ({"torch_home": 5}, "torch_home is int"),
    ({"created": "yesterday"}, "created 'yesterday' is not an ISO 8601 time"),
    ({"extra": 1}, "unknown key 'extra'"),
])
def test_malformed_documents_refused(change, words):
    assert words in _refusal(_doc(**change))


@pytest.mark.parametrize("data, words", [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[]", "the document is an array, not an object"),
    (b"null", "the document is null, not an object"),
    (b'{"format": NaN}', "NaN is not a JSON number"),
    (b"{}", "lacks checkpoints, format, format_version, manifests, versions"),
    (b'{"x": ' + b"9" * 5000 + b"}", "not a valid inventory"),
])
def test_garbage_refused(data, words):
    assert words in _refusal(data)


@pytest.mark.parametrize("opener, closer", [(b"[", b"]"), (b'{"a":', b"}")])
def test_deep_nesting_is_one_line_not_recursion_error(opener, closer):
    data = opener * 200_000 + closer * 200_000
    assert "nested too deeply" in _refusal(data)


def test_moderate_nesting_is_a_type_error_not_a_crash():
    doc = _doc(versions={"torch": [[[[["x"]]]]]})
    assert "versions.torch is list" in _refusal(doc)


def test_oversized_refused_unread():
    assert "too large" in _refusal(b" " * (16 << 20) + b"{}")
