"""The tvpack exception family.

Every error carries a one-line message meant for people; the CLI prints it to stderr and exits with
``exit_code`` (1, or 2 for usage mistakes). A traceback is shown only with ``--debug`` or
``TVPACK_DEBUG=1``.
"""
from __future__ import annotations


class TvpackError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def format(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(TvpackError):
    """The call itself is malformed (bad selector syntax, conflicting options)."""

    exit_code = 2


class SelectorError(TvpackError):
    """A selector names a model, weights enum or member that no registry has."""


class RegistryError(TvpackError):
    """A user registry module could not be imported or describes weights incorrectly."""


class DownloadError(TvpackError):
    """A transfer failed after its retries (server gone, 404, timeouts...)."""


class IntegrityError(TvpackError):
    """Bytes do not match what was expected (hash prefix, full sha256 or size)."""

    def __init__(self, what: str, *, expected: str, got: str, hint: str | None = None):
        super().__init__(f"{what}: expected {expected}, got {got}", hint=hint)
        self.expected = expected
        self.got = got


class OfflineError(TvpackError):
    """Something needed the network while offline mode is on, or weights are not cached."""


class CacheError(TvpackError):
    """The checkpoint cache cannot be used (unwritable, disk full, conflicting file)."""


class LockfileError(TvpackError):
    """A ``tvpack.lock`` file is missing, malformed or inconsistent."""


class BundleError(TvpackError):
    """A bundle archive is malformed, hostile or fails verification."""


class LoadError(TvpackError):
    """A model or weights cannot be rebuilt from a bundle or cache."""


class MirrorError(TvpackError):
    """A mirror destination cannot be written or read."""


class SignatureError(TvpackError):
    """A signature is missing, malformed, made by an untrusted key, or does not cover the bundle."""


class OCIError(DownloadError):
    """An OCI registry refused a request, or an image is not what tvpack expects (a DownloadError:
    transports raise DownloadError, IntegrityError or CacheError and nothing else)."""


class VolumeError(BundleError):
    """A bundle split into volumes has a missing, short, extra, reordered or corrupt part."""
