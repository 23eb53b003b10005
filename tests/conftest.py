"""Shared fixtures: the synthetic zoo, isolated TORCH_HOME, CLI runners.

Fixtures owned by one test module live in that module; cross-module ones are added here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ZOO_REGISTRY = "packager.testing.zoo"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test touches the real ~/.cache/torch, or inherits tvpack settings from the shell."""
    for name in ("TVPACK_REGISTRY", "TVPACK_MIRROR", "TVPACK_OFFLINE", "TVPACK_DEBUG", "XDG_CACHE_HOME",
                 "TVPACK_TRUSTED_KEYS", "TVPACK_SIGNING_KEY_PASSWORD", "TVPACK_LOCK_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("default-torch-home")))


@pytest.fixture(scope="session")
def zoo():
    """The built zoo module (built once per machine and torch version, then cached)."""
    import packager.testing.zoo as zoo_module

    return zoo_module


@pytest.fixture(scope="session")
def zoo_root(zoo) -> Path:
    """The zoo directory: a mirror root holding models/tvpack-zoo/<file>."""
    return zoo.zoo_dir()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def cli():
    """Invoke the real click CLI in-process; returns click's Result."""
    from click.testing import CliRunner

    from packager.cli import main

    def run(*args, **kwargs):
        runner = CliRunner()
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)

    return run


def run_tvpack(*args, env=None, check=False, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m packager ARGS`` as a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "packager", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"tvpack {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tvpack():
    return run_tvpack


def _missing(what: str) -> None:
    """Software a test needs is absent: skip locally, fail in CI (CI must install it)."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not installed")
    pytest.skip(f"{what} not installed")


def need_binary(name: str) -> str:
    """A program the test needs (PATH or /usr/sbin): skip locally when absent, fail in CI."""
    from servers import ServerSoftwareMissing, find_binary

    try:
        return find_binary(name)
    except ServerSoftwareMissing as exc:
        _missing(exc.what)


def need_server(factory, *args, **kwargs):
    """``factory(*args, **kwargs)`` for a tests/servers.py server (not started yet): skip
    locally when its software is missing, fail in CI."""
    from servers import ServerSoftwareMissing

    try:
        return factory(*args, **kwargs)
    except ServerSoftwareMissing as exc:
        _missing(exc.what)


@pytest.fixture
def no_creds(tmp_path, monkeypatch) -> Path:
    """No credential file of the real user is read: HOME (returned) and the containers auth file in tmp,
    DOCKER_CONFIG, XDG_RUNTIME_DIR and the CA-bundle variables unset."""
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "containers-auth.json"))
    for name in ("DOCKER_CONFIG", "XDG_RUNTIME_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return home


SMALL = ["zoo_shufflenet_v2", "zoo_quantized_shufflenet_v2"]  # two small zoo checkpoints: float and quantized


@pytest.fixture(scope="session")
def small_bundle(zoo_root, tmp_path_factory) -> Path:
    """:data:`SMALL` bundled through a directory mirror, once per session (tests that push, pull or sign it)."""
    from packager.bundle import bundle

    work = tmp_path_factory.mktemp("small-bundle")
    return bundle(SMALL, work / "small.tvpack", registry=[ZOO_REGISTRY], torch_home=work / "home",
                  mirrors=[str(zoo_root)], upstream=False)


@pytest.fixture
def oci_isolated(no_creds, tmp_path, monkeypatch, zoo_root) -> Path:
    """For tests against registries: no credentials, digest cache or registries.conf of the real user or machine
    (an empty registries.conf, returned, for the test to fill; /etc's drop-ins, which podman reads too, still
    count); the zoo registry module finds the zoo."""
    monkeypatch.setenv("TVPACK_ZOO_DIR", str(zoo_root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    conf = tmp_path / "registries.conf"
    conf.write_text("")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    return conf


@pytest.fixture
def registry(tmp_path, no_creds):
    """The CNCF distribution registry on loopback, anonymous (tests/registry_server.py)."""
    from registry_server import DistributionRegistry

    with need_server(DistributionRegistry, tmp_path) as reg:
        yield reg


@pytest.fixture
def auth_registry(tmp_path, no_creds):
    """The same with htpasswd auth: user alice, password s3cret."""
    from registry_server import DistributionRegistry

    with need_server(DistributionRegistry, tmp_path, users={"alice": "s3cret"}) as reg:
        yield reg


@pytest.fixture
def mirror_server(tmp_path):
    """A loopback HTTP mirror (packager.testing.server) over an empty ``tmp_path/"mirror"``: put files
    under ``server.root``; ``server.add_fault(...)``, ``server.transfers(path)`` for the log."""
    from packager.testing.server import MirrorServer

    with MirrorServer(tmp_path / "mirror") as server:
        yield server


@pytest.fixture
def zoo_server(zoo_root):
    """A loopback HTTP mirror serving the zoo (``--mirror zoo_server.url``)."""
    from packager.testing.server import MirrorServer

    with MirrorServer(zoo_root) as server:
        yield server


def synth_refs(root: Path, count: int = 2, size: int = 1 << 20, stem: str = "synth", names=None) -> list:
    """Random checkpoint files under ``root/models/synth`` (a mirror layout) and pinned refs for them,
    with download.pytorch.org urls (so ``--mirror URL --no-upstream`` serves them). ``names``: file
    stems to use instead of ``<stem><i>``."""
    import hashlib
    import random

    from packager.registry import WeightsRef

    folder = root / "models" / "synth"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(count):
        data = random.Random(f"{stem}{i}{size}").randbytes(size + i)
        sha = hashlib.sha256(data).hexdigest()
        base = names[i] if names else f"{stem}{i}"
        name = f"{base}-{sha[:8]}.pth"
        (folder / name).write_bytes(data)
        refs.append(WeightsRef(enum=f"Synth{i}_Weights", member="V1", url=f"https://download.pytorch.org/models/synth/{name}",
                               module="synth", models=(f"{stem}{i}",), size_hint=len(data), sha256=sha))
    return refs


def wait_for(predicate, timeout: float = 180.0, what: str = "a condition"):
    """Poll ``predicate()`` until it returns something truthy (returned) or fail after ``timeout`` s.

    The timeout only bounds a hang (a subprocess importing torch on a loaded machine can take a minute
    to get going): it never decides a test's outcome, so keep it generous."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def tvpack_command(*args) -> list[str]:
    return [sys.executable, "-m", "packager", *map(str, args)]


def tvpack_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **{k: str(v) for k, v in extra.items()}}


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs("2m")``: a fresh tmpfs of that size mounted under ``tmp_path`` (needs root: skipped
    elsewhere), unmounted when the test ends: a real disk to fill."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def tiny_disk(tmpfs) -> Path:
    """A 2 MB tmpfs to run out of space on."""
    return tmpfs("2m")
