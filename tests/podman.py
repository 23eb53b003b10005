"""Real podman (with runc) for tests: an image store of the test session's own, and cleanup.

    def test_x(podman):                        # the fixture (tests import it: ``from podman import podman``)
        podman("pull", "--tls-verify=false", f"{reg.host}/models/small:v1")
        podman.run(image, "/bin/busybox", "ls", "/models", mounts=[...])   # the sandbox's runtime flags
        path = podman.mount(image)              # ``podman image mount``, unmounted when the test ends
        base = podman.base_image()              # FROM scratch + busybox-static, built once per session

The store lives in a temporary directory (``--root`` / ``--runroot``), so nothing reaches the machine's
store, and a test's images and mounts are removed when it ends (the busybox base image stays for the
session). Podman reads /etc/containers/registries.conf unless told otherwise: ``CONTAINERS_REGISTRIES_CONF``
points it at an empty file of the session's, so a test passes its own.

This sandbox lacks CAP_SYS_RESOURCE and crun dislikes its cgroups: containers run with
``--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network none``.
Missing software (podman, runc, busybox) skips locally and fails under CI=true.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import need_binary

BASE_IMAGE = "localhost/tvpack-test/busybox:latest"
RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "none")


class Podman:
    """``podman`` over an isolated store under ``workdir``; calling it runs one podman command."""

    def __init__(self, workdir: Path):
        self.binary = need_binary("podman")
        need_binary("runc")
        self.busybox = need_binary("busybox")
        self.workdir = Path(workdir)
        # podman refuses a runroot longer than 50 characters (pytest's temp paths under xdist are longer)
        self.root, self.runroot = self.workdir / "root", Path(tempfile.mkdtemp(prefix="tvpack-podman-"))
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text("")
        self.env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                    "TMPDIR": str(self._mkdir("tmp"))}
        auth = self.workdir / "auth.json"  # no credentials of the real user
        auth.write_text('{"auths": {}}')
        self.env["REGISTRY_AUTH_FILE"] = str(auth)
        self._base: str | None = None

    def _mkdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __call__(self, *args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [self.binary, "--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "overlay",
                   "--cgroup-manager", "cgroupfs", "--events-backend", "none", *map(str, args)]
        proc = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def run(self, image: str, *command, mounts=(), check: bool = True) -> subprocess.CompletedProcess:
        """``podman run --rm`` with the sandbox's runtime flags; ``mounts``: ``--mount`` values."""
        flags = [f"--mount={m}" for m in mounts]
        return self("run", "--rm", *RUN_FLAGS, *flags, image, *command, check=check)

    def base_image(self) -> str:
        """A base image with ``/bin/busybox`` (there is none offline): ``FROM scratch``, built once."""
        if self._base is None:
            context = self._mkdir("busybox-context")
            shutil.copy(self.busybox, context / "busybox")
            (context / "Containerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\n")
            self("build", "--network", "none", "-t", BASE_IMAGE, str(context))
            self._base = BASE_IMAGE
        return self._base

    def build(self, tag: str, containerfile: str, context: Path | None = None) -> str:
        """``podman build -t TAG`` of ``containerfile`` (text) in ``context`` (an empty directory by default)."""
        context = context or self._mkdir(f"context-{tag.replace('/', '_').replace(':', '_')}")
        (context / "Containerfile").write_text(containerfile)
        self("build", "--network", "none", "--runtime", "runc", "-t", tag, str(context))
        return tag

    def mount(self, image: str) -> Path:
        """``podman image mount IMAGE``: the image's root filesystem (read-only overlay layers merged)."""
        return Path(self("image", "mount", image).stdout.strip())

    def images(self) -> list[str]:
        """Image ids in the store."""
        return self("images", "-q", "--no-trunc").stdout.split()

    def clean(self, keep=()) -> None:
        """Unmount every image and remove every image but those in ``keep`` (ids or names)."""
        self("image", "unmount", "--all", "--force", check=False)
        kept = set()
        for name in keep:
            proc = self("image", "inspect", "--format", "{{.Id}}", name, check=False)
            kept.update(proc.stdout.split())
        for image in self.images():
            if image.removeprefix("sha256:") not in kept:
                self("rmi", "--force", image, check=False)

    def reset(self) -> None:
        """Everything removed, every overlay mount under the store gone (the directory can then be deleted)."""
        self.clean()
        self("system", "reset", "--force", check=False)
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1].replace("\\040", " ")
            if target.startswith((str(self.workdir) + "/", str(self.runroot) + "/")) or target == str(self.runroot):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


@pytest.fixture(scope="session")
def podman_session(tmp_path_factory):
    pod = Podman(tmp_path_factory.mktemp("podman"))
    yield pod
    pod.reset()


@pytest.fixture
def podman(podman_session):
    """The session's :class:`Podman`; what a test pulls, builds or mounts is removed when it ends."""
    before = set(podman_session.images())
    yield podman_session
    podman_session.clean(keep=[*before, BASE_IMAGE] if podman_session._base else before)
