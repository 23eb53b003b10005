"""home.hub_dir must agree with torch.hub.get_dir() for every TORCH_HOME/XDG/HOME combination."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

from packager import home

CASES = list(itertools.product(
    [None, "", "/opt/th", "~/th", "rel/th"],  # TORCH_HOME
    [None, "", "/xdg", "~/xdg"],  # XDG_CACHE_HOME
    ["/home/alice", "/root"],  # HOME
))


def _torch_says(cases):
    """Ask torch.hub itself, in a subprocess per environment (torch reads the env at call time)."""
    script = (
        "import json, os, sys, torch.hub\n"
        "out = []\n"
        "for th, xdg, hm in json.loads(sys.argv[1]):\n"
        "    for k, v in (('TORCH_HOME', th), ('XDG_CACHE_HOME', xdg), ('HOME', hm)):\n"
        "        os.environ.pop(k, None)\n"
        "        if v is not None: os.environ[k] = v\n"
        "    out.append(torch.hub.get_dir())\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)


def test_hub_dir_matches_torch_hub_for_every_combination(monkeypatch):
    expected = _torch_says(CASES)
    for (torch_home, xdg, user_home), want in zip(CASES, expected):
        for name, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg), ("HOME", user_home)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert str(home.hub_dir()) == os.path.normpath(want), (torch_home, xdg, user_home)


def test_override_plays_the_role_of_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", "/elsewhere")
    assert home.hub_dir(tmp_path) == tmp_path / "hub"
    assert home.checkpoints_dir(tmp_path) == tmp_path / "hub" / "checkpoints"


def test_torch_hub_set_dir_is_honoured(tmp_path):
    import torch.hub

    previous = torch.hub._hub_dir
    try:
        torch.hub.set_dir(str(tmp_path / "custom-hub"))
        assert home.hub_dir() == tmp_path / "custom-hub"
    finally:
        torch.hub._hub_dir = previous


def test_importing_home_does_not_import_torch():
    code = "import sys, packager.home; packager.home.hub_dir(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
