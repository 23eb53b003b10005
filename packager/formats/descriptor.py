"""OCI manifests and descriptors as every tvpack reader decodes them: the image, the ModelPack artifact and the
attached signature artifact share this one decoder (a JSON object, content descriptors with a sha256 digest and a
size in bounds, annotations, tvpack's format annotations), then add what is their own. Pure: bytes in, values or a
one-line refusal out (``refuse(why)`` raises the caller's error, which names what was being read)."""
from __future__ import annotations

import json
import re
from typing import Callable, NoReturn

from ..errors import OCIError

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

Refuse = Callable[[str], NoReturn]


def is_digest(value) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def is_size(value) -> bool:
    return type(value) is int and value >= 0


def json_object(data: bytes, refuse: Refuse, what: str = "the manifest") -> dict:
    """``data`` decoded: a JSON object, else ``refuse``."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        refuse(f"{what} is not JSON")
    if not isinstance(document, dict):
        refuse(f"{what} is not a JSON object")
    return document


def annotations(obj: dict) -> dict:
    """An object's ``annotations`` (none, or not an object: empty)."""
    found = obj.get("annotations")
    return found if isinstance(found, dict) else {}


def is_descriptor(raw, media_types: tuple[str, ...] | None = None, *, min_size: int = 0,
                  max_size: int | None = None) -> bool:
    """Whether ``raw`` is a content descriptor: an object, its ``mediaType`` one of ``media_types`` (when given),
    a sha256 ``digest`` and an integer ``size`` from ``min_size`` to ``max_size``."""
    return (isinstance(raw, dict) and (media_types is None or raw.get("mediaType") in media_types)
            and is_digest(raw.get("digest")) and is_size(raw.get("size")) and raw["size"] >= min_size
            and (max_size is None or raw["size"] <= max_size))


def layers(document: dict, refuse: Refuse) -> list:
    """The ``layers`` list: present and not empty, else ``refuse``."""
    found = document.get("layers")
    if not isinstance(found, list) or not found:
        refuse("no layers")
    return found


def format_version(notes: dict, refuse: Refuse, where: str, *, key: str, value: str, version_key: str,
                   reads: int, what: str) -> int:
    """tvpack's format annotations (``key=value`` and ``version_key``) checked; the version. A version newer than
    ``reads`` is the one refusal that is not "not ours": it says to upgrade."""
    if notes.get(key) != value:
        refuse(f"no {key}={value} annotation")
    version = notes.get(version_key)
    if not (isinstance(version, str) and version.isdigit()):
        refuse(f"no {version_key} annotation")
    if int(version) > reads:
        raise OCIError(f"{where}: tvpack {what} format {version} is newer than this tvpack reads ({reads}); "
                       "upgrade tvpack")
    return int(version)


__all__ = ["DIGEST", "annotations", "format_version", "is_descriptor", "is_digest", "is_size", "json_object",
           "layers"]
