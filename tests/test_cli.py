"""The CLI shell: help, errors and exit codes, `tvpack list`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ZOO_REGISTRY

from packager.errors import SelectorError


def test_help_is_fast_and_does_not_import_torch(tvpack):
    code = "import sys; from packager.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    proc = tvpack("--help", check=True)
    for command in ("list", "fetch", "bundle", "install", "inspect", "verify", "cache"):
        assert command in proc.stdout


def test_list_all_json_gives_every_torchvision_weights(cli):
    result = cli("list", "--all", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert len(rows) == 166
    assert round(sum(r["size_mb"] for r in rows) / 1000, 1) == 39.8
    row = next(r for r in rows if r["weights"] == "ResNet50_Weights.IMAGENET1K_V2")
    assert row["url"] == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert row["hash_prefix"] == "11ad3fa6" and row["models"] == ["resnet50"] and row["cached"] is False
    assert row["metric"].startswith("ImageNet-1K acc@1")


def test_list_table_filters_and_cached(cli, torch_home):
    result = cli("list", "resnet50", "--module", "classification")
    assert result.exit_code == 0
    assert "ResNet50_Weights.IMAGENET1K_V1" in result.output and "2 weights" in result.output
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth").write_bytes(b"x")
    rows = json.loads(cli("list", "--cached", "--json").output)
    assert [r["weights"] for r in rows] == ["ResNet50_Weights.IMAGENET1K_V2"]
    rows = json.loads(cli("list", "--module", "optical_flow", "--json").output)
    assert rows and all(r["family"] == "optical_flow" for r in rows)


def test_list_with_zoo_registry(cli, zoo):
    rows = json.loads(cli("list", "zoo_*", "--registry", ZOO_REGISTRY, "--json").output)
    assert len(rows) == 9


def test_unknown_model_exit_1_with_suggestion(tvpack):
    proc = tvpack("list", "resnt50")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "tvpack: error: unknown model 'resnt50'; did you mean resnet50 or resnet152 or resnet101?"
    assert "Traceback" not in proc.stderr


def test_bad_syntax_exit_2(tvpack):
    proc = tvpack("list", "a:b:c")
    assert proc.returncode == 2 and "bad selector" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_traceback(tvpack):
    proc = tvpack("--debug", "list", "resnt50")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = tvpack("list", "resnt50", env={"TVPACK_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def test_global_options_are_settings_of_one_command_not_of_the_process(cli, torch_home):
    """--debug and --live-registry travel as a value (click's context object), never written to os.environ: a
    later command in the same process (a notebook, a service calling main) has neither unless given again."""
    try:
        with pytest.raises(SelectorError):  # --debug: the error itself, traceback and all
            cli("--debug", "--live-registry", "list", "resnt50")
        assert "TVPACK_DEBUG" not in os.environ and "TVPACK_NO_SNAPSHOT" not in os.environ
        result = cli("list", "resnt50")  # no --debug: one line, exit 1
        assert result.exit_code == 1 and result.output.startswith("tvpack: error: unknown model 'resnt50'")
    finally:
        os.environ.pop("TVPACK_DEBUG", None)
        os.environ.pop("TVPACK_NO_SNAPSHOT", None)


def test_malformed_mirror_fails_at_once_with_exit_2(cli, torch_home):
    """A mirror typo is one usage line naming the mirror, not an 'unexpected ValueError' or a
    per-file failure after lock files were created."""
    for spec in ("http://[::1", "ftp://x"):
        result = cli("fetch", "resnet50", "--mirror", spec, "--no-upstream")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"tvpack: error: bad mirror '{spec}'") and "bug" not in result.output
    assert not (torch_home / "hub").exists()


def test_empty_torch_home_option_is_a_usage_error(cli, tmp_path, monkeypatch):
    """``--torch-home ''`` used to put hub/ into the current directory."""
    monkeypatch.chdir(tmp_path)
    for args in (("cache", "ls"), ("fetch", "resnet50", "--dry-run")):
        result = cli(*args, "--torch-home", "")
        assert result.exit_code == 2 and "--torch-home" in result.output
    assert list(tmp_path.iterdir()) == []


def test_output_dash_or_trailing_slash_is_a_usage_error(cli, tmp_path, monkeypatch):
    """``-o -`` used to write a file named '-', ``-o newdir/`` a file named 'newdir'."""
    monkeypatch.chdir(tmp_path)
    for command in ("bundle", "lock"):
        for output in ("-", f"{tmp_path}/newdir/"):
            result = cli(command, "resnet50", "-o", output)
            assert result.exit_code == 2, result.output
            assert "give a file name" in result.output
    assert list(tmp_path.iterdir()) == []


# One failing call of every command that has --json (no network: missing files, unknown names, bad values).
FAILING_JSON = {
    "list": (["list", "nosuch"], "SelectorError", 1),
    "fetch": (["fetch", "nosuch"], "SelectorError", 1),
    "lock": (["lock", "nosuch", "-o", "x.lock"], "SelectorError", 1),
    "bundle": (["bundle", "nosuch", "-o", "x.tar"], "SelectorError", 1),
    "inspect": (["inspect", "nope.tar"], "BundleError", 1),
    "verify": (["verify", "nope.tar"], "BundleError", 1),
    "install": (["install", "nope.tar"], "BundleError", 1),
    "sign": (["sign", "nope.tar", "--key", "nope.key"], "SignatureError", 1),
    "split": (["split", "nope.tar", "--size", "1M"], "BundleError", 1),
    "push": (["push", "nope.tar", "oci://127.0.0.1:1/r:t"], "BundleError", 1),
    "pull": (["pull", "notaref", "-o", "x.tar"], "UsageError", 2),
    "mirror": (["mirror", "nosuch", "--to", "d"], "SelectorError", 1),
    "predict": (["predict", "nope.tar", "resnet50", "x.png"], "BadParameter", 2),
    "cache ls": (["cache", "ls", "--torch-home", "afile"], "BadParameter", 2),
    "channels": (["channels", "--torch-home", "afile"], "BadParameter", 2),
    "doctor": (["doctor", "--torch-home", "afile"], "BadParameter", 2),
    "cache verify": (["cache", "verify", "nosuch"], "SelectorError", 1),
    "cache prune": (["cache", "prune", "--torch-home", "afile"], "BadParameter", 2),
    "cache rm": (["cache", "rm", "nosuch"], "SelectorError", 1),
}


def _commands_with_json() -> set[str]:
    import click

    from packager.cli import main

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        elif any(p.name == "as_json" for p in command.params):
            yield " ".join(path)

    return set(walk(main, []))


def test_every_command_with_json_is_covered_below():
    assert set(FAILING_JSON) == _commands_with_json()


@pytest.mark.parametrize("command", sorted(FAILING_JSON))
def test_with_json_a_failure_is_json_on_stdout_and_one_line_on_stderr(command, cli, tmp_path, monkeypatch):
    """One rule for every command: stdout always parses with --json (an error object when it fails), and the
    error is still said on stderr."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    args, kind, code = FAILING_JSON[command]
    result = cli(*args, "--json")
    assert result.exit_code == code, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["error"]["type"] == kind and document["error"]["exit_code"] == code
    message = document["error"]["message"]
    assert message and "\n" not in message
    if kind != "BadParameter":
        assert result.stderr.strip().splitlines() == [f"tvpack: error: {message}"]
    else:  # click's own usage errors: its usage lines, then the message
        assert result.stderr.strip().splitlines()[-1] == f"Error: {message}"


def test_with_json_a_report_of_failures_is_the_one_document(cli, torch_home):
    """A command whose report already says what failed (cache verify) prints that, not a second document."""
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "tampered-0123abcd.pth").write_bytes(b"not what its name says")
    result = cli("cache", "verify", "--json")
    assert result.exit_code == 1, result.output
    (report,) = json.loads(result.stdout)  # one document: the report
    assert report["ok"] is False
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tvpack: error: 1 of 1 cached files failed verification")


def test_with_json_a_failure_is_json_in_a_real_process(tvpack, tmp_path):
    proc = tvpack("inspect", tmp_path / "nope.tar", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == {"type": "BundleError", "message": f"no such bundle: {tmp_path}/nope.tar",
                                                "exit_code": 1}
    assert proc.stderr == f"tvpack: error: no such bundle: {tmp_path}/nope.tar\n"


def test_a_file_given_where_selectors_belong_is_named_as_such(cli, tvpack, tmp_path, monkeypatch):
    """`tvpack bundle s.tar -o x.tar`: not "unknown weights enum 's'" but what was given and where files go."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.tar").write_bytes(b"a bundle, say")
    words = "tvpack: error: 's.tar' is a file, given where selectors belong: selectors name weights"
    for args in (["bundle", "s.tar", "-o", "x.tar"], ["fetch", "s.tar", "--dry-run"], ["lock", "s.tar", "-o", "l"]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(words) and "a lockfile goes after --lock" in line, line
    assert not (tmp_path / "x.tar").exists()
    proc = tvpack("bundle", "s.tar", "-o", "x.tar", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(words)
    assert cli("fetch", "resnet50", "--dry-run").exit_code == 0  # a selector that is no file is unaffected
    (tmp_path / "resnet50").write_text("")  # nor one that happens to name a file too: it resolves first
    assert cli("fetch", "resnet50", "--dry-run").exit_code == 0
