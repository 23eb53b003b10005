"""What the CLI prints about counts and sizes reads as English: "1 part", "1 checkpoint file",
"(1 file)"; ``sign`` says whether the file grew instead of "0 bytes added". And the per-command
options the docs promise: ``verify --torch-home`` (its verdict depends on ``<hub>/tvpack/trusted``)."""
from __future__ import annotations

import re
import subprocess

from conftest import ROOT, ZOO_REGISTRY, run_tvpack

from packager.fsutil import plural
from packager.signing import trusted_dir

ONE = "zoo_shufflenet_v2"  # one small checkpoint


def test_plural():
    assert [plural(n, "part") for n in (0, 1, 2)] == ["0 parts", "1 part", "2 parts"]
    assert plural(1, "checkpoint file") == "1 checkpoint file" and plural(3, "entry", "entries") == "3 entries"


def test_no_count_in_the_cli_is_pluralised_by_hand():
    """A count printed before a plural noun (``{len(x)} files``) is wrong for 1: every one goes through plural()
    ("2 of {n} files" is fine: the noun agrees with the total)."""
    pattern = re.compile(r"(?<!of )\{[^{}]*\}\s+(?!weights\b)(files|parts|checkpoints|checkpoint files|blobs|manifests|"
                         r"signatures|keys|layers|bytes added)\b|\{len\([^{}]*\)\} \{\w+\}")
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted((ROOT / "packager" / "cli").glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_one_checkpoint_reads_as_one(zoo_root, tmp_path):
    src = ["--registry", ZOO_REGISTRY, "--mirror", zoo_root, "--no-upstream", "--torch-home", tmp_path / "home"]
    out = run_tvpack("bundle", ONE, *src, "-o", tmp_path / "one.tar", check=True).stdout
    assert "1 checkpoint file carried" in out
    split = run_tvpack("bundle", ONE, *src, "--split", "100M", "-o", tmp_path / "s.tar", check=True).stdout
    assert "wrote 1 part of at most 100M" in split
    assert "1 weights in 1 file," in run_tvpack("inspect", tmp_path / "one.tar", check=True).stdout
    # the checkpoint and the ML-BOM
    assert ": 1 weights, 2 files, " in run_tvpack("verify", tmp_path / "one.tar", check=True).stdout
    assert "1 file, " in run_tvpack("cache", "ls", "--torch-home", tmp_path / "home", check=True).stdout
    site = run_tvpack("inventory", "--torch-home", tmp_path / "home", "-o", tmp_path / "SITE.json", check=True)
    assert ": 1 checkpoint (" in site.stdout and "0 installed manifests" in site.stdout


    # verify --torch-home: the verdict follows that TORCH_HOME's trust policy (<hub>/tvpack/trusted/)
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", tmp_path / "k.pem"],
                   check=True)
    strict = tmp_path / "strict"
    trusted_dir(strict / "hub").mkdir(parents=True)
    subprocess.run(["openssl", "ec", "-in", tmp_path / "k.pem", "-pubout", "-out", trusted_dir(strict / "hub") / "k.pub"],
                   check=True, capture_output=True)
    refused = run_tvpack("verify", tmp_path / "one.tar", "--torch-home", strict)
    assert refused.returncode == 1 and "is not signed" in refused.stderr and str(strict) in refused.stderr

    signed = run_tvpack("sign", tmp_path / "one.tar", "--key", tmp_path / "k.pem", check=True).stdout
    assert "bytes added" not in signed
    assert re.search(r", the file (grew by \d+(\.\d)? [KM]?B|kept its size \(the signature fits in the archive's "
                     r"end padding\))$", signed.strip()), signed
    assert "signed by key" in run_tvpack("verify", tmp_path / "one.tar", "--torch-home", strict, check=True).stdout

