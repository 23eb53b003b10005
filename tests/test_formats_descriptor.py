"""packager.formats.descriptor: the one decoder of OCI manifests and descriptors that the image, the ModelPack
artifact and the attached signature artifact share."""
from __future__ import annotations

import json

import pytest

from packager.errors import OCIError
from packager.formats import descriptor as D
from packager.oci.attached import _signature_layer, artifact_manifest

GOOD = "sha256:" + "ab" * 32
MID = "0123456789abcdef"
SIG = f"hub/tvpack/signatures/{MID}.sig"


def refuse(why: str):
    raise OCIError(f"x: not ours ({why})")


@pytest.mark.parametrize("raw, ok", [
    ({"mediaType": "m", "digest": GOOD, "size": 3}, True),
    ({"mediaType": "m", "digest": "md5:abc", "size": 3}, False),
    ({"mediaType": "m", "digest": GOOD, "size": -1}, False),
    ({"mediaType": "m", "digest": GOOD, "size": True}, False),  # a bool is not a size
    ({"mediaType": "other", "digest": GOOD, "size": 3}, False),
    ([GOOD, 3], False),
])
def test_a_descriptor_is_an_object_with_a_media_type_a_sha256_digest_and_a_size(raw, ok):
    assert D.is_descriptor(raw, ("m",)) is ok


def test_bounds_json_and_format_annotations():
    assert not D.is_descriptor({"digest": GOOD, "size": 0}, min_size=1)
    assert not D.is_descriptor({"digest": GOOD, "size": 9}, max_size=8)
    with pytest.raises(OCIError, match="the manifest is not JSON"):
        D.json_object(b"{", refuse)
    with pytest.raises(OCIError, match="is not a JSON object"):
        D.json_object(b"[]", refuse)
    notes = {"f": "tvpack", "v": "2"}
    assert D.format_version(notes, refuse, "x", key="f", value="tvpack", version_key="v", reads=2, what="t") == 2
    with pytest.raises(OCIError, match="newer than this tvpack reads .*upgrade tvpack"):
        D.format_version(notes, refuse, "x", key="f", value="tvpack", version_key="v", reads=1, what="t")
    with pytest.raises(OCIError, match="no f=zip annotation"):
        D.format_version(notes, refuse, "x", key="f", value="zip", version_key="v", reads=2, what="t")


def test_an_attached_signature_whose_layer_digest_is_not_sha256_is_refused():
    """The signature artifact's layer is held to the same descriptor rules as an image's layers."""
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": GOOD, "size": 100}
    good = artifact_manifest(subject, SIG, b"signature bytes", MID)
    path, layer = _signature_layer(good, GOOD, "x")
    assert path == SIG and layer["size"] == len(b"signature bytes")
    document = json.loads(good)
    document["layers"][0]["digest"] = "sha512:" + "00" * 64
    with pytest.raises(OCIError, match="an attached signature is malformed .*no valid size and digest"):
        _signature_layer(json.dumps(document).encode(), GOOD, "x")
