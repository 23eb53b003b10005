"""CNCF ModelPack manifest and config of a bundle, encoded and parsed (pure); the config is checked against
the spec's own JSON schema (tests/data/modelpack/config-schema.json, Apache-2.0, see NOTICE there)."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from packager.errors import OCIError
from packager.formats import modelpack as M
from packager.formats.image import canonical_json

SCHEMA = Path(__file__).parent / "data" / "modelpack" / "config-schema.json"
MTIME = 1700000000


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def checkpoint(stem: str, data: bytes) -> M.ModelFile:
    sha = hashlib.sha256(data).hexdigest()
    return M.ModelFile("weight", "sha256:" + sha, len(data), f"hub/checkpoints/{stem}-{sha[:8]}.pth", MTIME)


FILES = [checkpoint("zeta", b"z" * 100), checkpoint("alpha", b"a" * 50),
         M.ModelFile("manifest", digest(b"{}"), 2, "hub/tvpack/manifests/0123456789abcdef.json", MTIME),
         M.ModelFile("member", digest(b"sig"), 3, "hub/tvpack/signatures/0123456789abcdef.sig.json", MTIME)]
WEIGHTS = ["Alpha_Weights.V1", "Zeta_Weights.V1"]


def encoded(**config_kwargs) -> tuple[bytes, bytes]:
    config = M.encode_config(FILES, name="tvpack-0123456789abcdef", **config_kwargs)
    return config, M.encode_manifest(config, digest(config), FILES, "0123456789abcdef", WEIGHTS)


def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_manifest_layout_per_the_spec():
    config, data = encoded()
    document = json.loads(data)
    assert data == canonical_json(document)  # canonical: the digest is a function of the bundle
    assert document["mediaType"] == "application/vnd.oci.image.manifest.v1+json" and document["schemaVersion"] == 2
    assert document["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert document["config"] == {"mediaType": "application/vnd.cncf.model.config.v1+json", "digest": digest(config),
                                  "size": len(config)}
    layers = document["layers"]
    assert [layer["mediaType"] for layer in layers] == ["application/vnd.cncf.model.weight.v1.raw"] * 2 + [
        "application/vnd.cncf.model.weight.config.v1.raw"] * 2
    # one raw layer per checkpoint, in path order; its digest is the checkpoint's own sha256
    assert [layer["annotations"]["org.cncf.model.filepath"] for layer in layers[:2]] == sorted(
        f.path for f in FILES if f.kind == "weight")
    alpha = layers[0]
    assert alpha["digest"] == "sha256:" + hashlib.sha256(b"a" * 50).hexdigest() and alpha["size"] == 50
    annotations = alpha["annotations"]
    assert annotations["org.opencontainers.image.title"] == annotations["org.cncf.model.filepath"].split("/")[-1]
    assert json.loads(alpha["annotations"]["org.cncf.model.file.metadata+json"]) == {
        "name": FILES[1].path, "mode": 0o644, "uid": 0, "gid": 0, "size": 50, "mtime": "2023-11-14T22:13:20Z",
        "typeflag": ord("0")}
    assert layers[2]["annotations"]["org.cncf.model.filepath"] == "hub/tvpack/manifests/0123456789abcdef.json"


def test_round_trip():
    config, data = encoded()
    info = M.parse_manifest(data, "", "oci://h/r:t")
    assert info.manifest_id == "0123456789abcdef" and info.weights == tuple(WEIGHTS)
    assert info.files == tuple(M.order(FILES)) and info.manifest_file == FILES[2]
    assert [f.sha256 for f in info.weight_files] == [hashlib.sha256(b"a" * 50).hexdigest(),
                                                     hashlib.sha256(b"z" * 100).hexdigest()]
    assert info.member_files == (FILES[3],)
    assert info.size == len(config) + 155 and info.config_digest == digest(config)
    assert M.parse_config(config, info, "x")["modelfs"]["diffIds"] == [f.digest for f in info.files]


@pytest.mark.parametrize("kwargs", [{}, {"description": "two classifiers", "created": MTIME, "params": 25557032,
                                         "precision": "float32"}])
def test_config_is_valid_against_the_specs_schema(kwargs):
    config, _ = encoded(**kwargs)
    document = json.loads(config)
    validator().validate(document)
    assert document["config"]["format"] == "pt"
    assert document["modelfs"] == {"type": "layers", "diffIds": [f.digest for f in M.order(FILES)]}
    if kwargs:
        assert document["descriptor"]["createdAt"] == "2023-11-14T22:13:20Z"
        assert document["config"]["paramSize"] == "25.6M"


@pytest.mark.parametrize("change", [
    lambda c: c.pop("modelfs"),
    lambda c: c["modelfs"].update(diffIds=[]),
    lambda c: c["descriptor"].update(name=""),
    lambda c: c["config"].update(paramsize="1M"),
    lambda c: c["descriptor"].update(createdAt="yesterday"),
])
def test_the_schema_check_can_fail(change):
    """The validator in the test above is not vacuous: what the schema forbids, it refuses."""
    jsonschema = pytest.importorskip("jsonschema")
    document = json.loads(encoded()[0])
    change(document)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(document)


@pytest.mark.parametrize("count, expected", [(999, "999"), (1000, "1K"), (2_542_856, "2.5M"), (25_557_032, "25.6M"),
                                             (6_700_000_000, "6.7B"), (1_000_000_000_000, "1T")])
def test_param_size(count, expected):
    assert M.param_size(count) == expected


def test_a_config_needs_a_name():
    with pytest.raises(OCIError, match="needs a model name"):
        M.encode_config(FILES, name="")


def test_is_modelpack():
    _, data = encoded()
    assert M.is_modelpack(json.loads(data))
    assert not M.is_modelpack({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}})
    assert not M.is_modelpack([])


def _layer(d, i):
    return d["layers"][i]


def _meta(d, i, **changes):
    annotations = _layer(d, i)["annotations"]
    meta = json.loads(annotations[M.A_FILE_METADATA])
    meta.update(changes)
    annotations[M.A_FILE_METADATA] = json.dumps(meta)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(artifactType="application/vnd.example+json"), "artifactType"),
    (lambda d: d.update(mediaType="application/vnd.oci.image.index.v1+json"), "media type"),
    (lambda d: d["config"].update(mediaType="application/vnd.oci.image.config.v1+json"), "its config is not"),
    (lambda d: d["config"].update(size=64 << 20), "its config is not"),
    (lambda d: d["annotations"].pop("org.tvpack.format"), "no org.tvpack.format"),
    (lambda d: d["annotations"].update({"org.tvpack.format.version": "7"}), "newer than this tvpack reads"),
    (lambda d: d["annotations"].update({"org.tvpack.manifest.id": "fedcba9876543210"}), "the annotations say"),
    (lambda d: d.update(layers=[]), "no layers"),
    (lambda d: _layer(d, 0).update(mediaType="application/vnd.cncf.model.weight.v1.tar"), "not a raw weight"),
    (lambda d: _layer(d, 0).update(digest="sha256:1234"), "no sha256 digest"),
    (lambda d: _layer(d, 0).update(digest="sha256:" + "0" * 64), "contradicts its file name"),
    (lambda d: _layer(d, 0)["annotations"].update({M.A_FILEPATH: "hub/checkpoints/../../etc/passwd"}), "no valid"),
    (lambda d: _layer(d, 0)["annotations"].update({M.A_FILEPATH: "hub/tvpack/x.pth"}), "not under hub/checkpoints"),
    (lambda d: _layer(d, 3)["annotations"].update({M.A_FILEPATH: "hub/notes/x.txt"}), "not a tvpack member"),
    (lambda d: _layer(d, 0)["annotations"].pop(M.A_FILE_METADATA), "no org.cncf.model.file.metadata"),
    (lambda d: _meta(d, 0, size=1), "file metadata"),
    (lambda d: _meta(d, 0, mode=0o4755), "file metadata"),
    (lambda d: _meta(d, 0, mtime="2023-11-14T22:13:20"), "file metadata"),  # no time zone
    (lambda d: d["layers"].reverse(), "not checkpoints by path"),
    (lambda d: d["layers"].pop(2), "0 bundle manifests"),
    (lambda d: d["layers"].insert(0, copy.deepcopy(_layer(d, 0))), "a file in two layers"),
])
def test_refusals_are_one_line(change, expected):
    _, data = encoded()
    document = json.loads(data)
    change(document)
    with pytest.raises(OCIError) as err:
        M.parse_manifest(json.dumps(document).encode(), "", "oci://h/r:t")
    assert err.value.message.startswith("oci://h/r:t: ") and expected in err.value.message, err.value.message
    assert "\n" not in err.value.message


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["modelfs"]["diffIds"].reverse(), "diffIds are not the manifest's"),
    (lambda c: c.update(extra=1), "descriptor, config and modelfs"),
    (lambda c: c.update(config=[]), "no config object"),
    (lambda c: c["modelfs"].update(type="tar"), "modelfs is not"),
])
def test_config_refusals(change, expected):
    config, data = encoded()
    info = M.parse_manifest(data, "", "x")
    document = json.loads(config)
    change(document)
    with pytest.raises(OCIError, match=expected):
        M.parse_config(json.dumps(document).encode(), info, "x")
    with pytest.raises(OCIError, match="not JSON"):
        M.parse_config(b"{", info, "x")
