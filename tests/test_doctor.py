"""``tvpack --version`` and ``tvpack doctor`` (cli/doctor.py): what this machine's tvpack would use,
read the way the library reads it, without importing torch."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata

from conftest import ROOT, run_tvpack

from packager.signing import trusted_dir

NO_TORCH = ("import sys, runpy\n"
            "sys.argv = ['tvpack', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('packager', run_name='__main__')\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")


def _without_torch(*args, env=None):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)} if env else None, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_version_names_tvpack_torch_torchvision_and_python_without_importing_torch():
    out = _without_torch("--version")
    assert out.strip() == (f"tvpack 0.1.0, torch {metadata.version('torch')}, "
                           f"torchvision {metadata.version('torchvision')}, Python {platform.python_version()}")


def test_doctor_reports_what_is_configured(tmp_path):
    import os

    home = tmp_path / "th"
    folder = trusted_dir(home / "hub")
    folder.mkdir(parents=True)
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", tmp_path / "k.pem"],
                   check=True)
    subprocess.run(["openssl", "ec", "-in", tmp_path / "k.pem", "-pubout", "-out", folder / "k.pub"], check=True,
                   capture_output=True)
    auth, conf = tmp_path / "auth.json", tmp_path / "registries.conf"
    auth.write_text('{"auths": {}}')
    conf.write_text("")
    env = {**os.environ, "TORCH_HOME": str(home), "TVPACK_MIRROR": "http://127.0.0.1:9/,/srv/m",
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "REGISTRY_AUTH_FILE": str(auth),
           "CONTAINERS_REGISTRIES_CONF": str(conf), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    report = json.loads(_without_torch("doctor", "--json", env=env))
    assert report["torch_home"]["path"] == str(home) and report["torch_home"]["origin"] == "TORCH_HOME"
    assert report["trust_policy"]["enforced"] and report["trust_policy"]["keys"] == 1
    assert report["mirrors"]["mirrors"] == ["http://127.0.0.1:9/", "/srv/m"]
    assert report["registries_conf"]["path"] == str(conf)
    assert report["credentials"]["oci_found"] == [str(auth)] and report["credentials"]["login_writes"] == str(auth)
    assert report["s3"]["endpoint"] == "http://127.0.0.1:9"
    assert report["snapshot"]["state"] == "missing"  # a fresh XDG_CACHE_HOME: never written there
    assert set(report["make_test"]["tools"]) == {"nginx", "docker-registry", "htpasswd", "skopeo", "umoci", "podman"}
    assert report["versions"]["torchvision"] == metadata.version("torchvision")

    text = run_tvpack("doctor", "--torch-home", tmp_path / "other", env=env, check=True).stdout.splitlines()
    assert len(text) == len(report)  # one line per check
    lines = {line.split("  ", 1)[0]: line for line in text}
    assert str(tmp_path / "other") in lines["TORCH_HOME"] and "--torch-home" in lines["TORCH_HOME"]
    assert "none: unsigned bundles are accepted" in lines["trust policy"]  # the other TORCH_HOME has no keys


def test_doctor_names_an_unreadable_trust_policy_instead_of_failing(tmp_path):
    folder = trusted_dir(tmp_path / "hub")
    folder.mkdir(parents=True)
    (folder / "broken.pub").write_text("not a key")
    proc = run_tvpack("doctor", "--torch-home", tmp_path, check=True)
    assert "trust policy" in proc.stdout and "unreadable: " in proc.stdout and "broken.pub" in proc.stdout
