"""The checkpoint cache: fetch under locks, place atomically, remember what was verified.

Files land at ``<hub>/checkpoints/<basename(url)>``, the torch.hub layout, so torchvision finds them
and never downloads. Correctness never rests on the locks (they can be silent no-ops on NFS or
Lustre): every transfer writes its own uniquely named part file in the same directory, which is
fsynced and verified before ``os.replace`` gives it the final name (:mod:`.fetching`).

The rooms of the package:

* :mod:`.layout`: :class:`HubLayout`, every path under ``<hub>``, and how tvpack names its files there;
* :mod:`.index`: the verification index, so an unchanged file is never hashed twice;
* :mod:`.fetching`: fetch, with its locks, part files, workers and progress;
* :mod:`.installed`: installed manifests, install records, which manifest is current for each weights;
* :mod:`.scan`: ``cache ls`` (:func:`scan_cache`) and the one reader of installed state (:func:`scan_hub`);
* :mod:`.verify`, :mod:`.prune`: ``cache verify``, ``cache prune`` and ``cache rm``;
* :mod:`.lockfile`: writing ``tvpack.lock``;

A cache that is read-only to us (a read-only mount, another user's directory) serves every file
that is present and verified without writing anything; only what must be written fails, in one
line. In a group-shared cache (``chgrp TEAM DIR; chmod 2775 DIR``) everything created is left
usable by the whole group (:mod:`packager.fsutil`).

The fetching module is ``fetching``, not ``fetch``, so that importing it never shadows the function
``packager.cache.fetch``. (``staging`` is both a module and the function re-exported here; the module
moves into the OCI store.)
"""
from __future__ import annotations

from ..fsutil import hash_file
from .fetching import FetchResult, ensure_cached, fetch, fetch_results, plan
from .index import _update_index, file_sha256, index_entry, record_verified
from .installed import InstalledWeights, ManifestInfo, read_manifest, record_install
from .layout import _HOST, PART_SUFFIX, STAGING_DIR, TORCH_HUB_PARTIAL, HubLayout
from .lockfile import write_lockfile
from .prune import Removal, prune_cache, remove_from_cache
from .scan import CachedFile, CacheInfo, HubInfo, scan_cache, scan_hub
from .verify import VerifyResult, verify_cache

__all__ = [
    "fetch", "fetch_results", "ensure_cached", "plan", "FetchResult",
    "file_sha256", "record_verified", "index_entry", "hash_file",
    "scan_cache", "CacheInfo", "CachedFile", "verify_cache", "VerifyResult",
    "prune_cache", "remove_from_cache", "Removal", "STAGING_DIR",
    "HubLayout", "write_lockfile", "scan_hub", "HubInfo", "ManifestInfo", "InstalledWeights", "record_install",
    "read_manifest", "PART_SUFFIX", "TORCH_HUB_PARTIAL",
    # for the tests: the index writer and the host directory name
    "_update_index", "_HOST",
]
