"""packager.config: one frozen value says how a call moves bytes; the older keywords build the same value."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import synth_refs

from packager import fetch
from packager.config import Config, config_from
from packager.errors import OfflineError
from packager.report import SILENT, Recorder, TqdmReporter
from packager.transport import Policy


def test_a_config_is_one_frozen_value_and_the_keywords_lay_over_it():
    base = Config(mirrors=["http://m.example/"], jobs=2, lock_timeout=3.0)
    assert base.mirrors == ("http://m.example/",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.jobs = 8
    merged = config_from(base, jobs=8, offline=None, upstream=False, endpoint_url="http://127.0.0.1:9")
    assert (merged.jobs, merged.upstream, merged.lock_timeout, merged.mirrors) == (8, False, 3.0, ("http://m.example/",))
    assert merged.transfer_policy.s3_endpoint_url == "http://127.0.0.1:9"  # the transports read it in the policy
    assert config_from(None, policy=Policy(s3_endpoint_url="http://x:1")).endpoint_url == "http://x:1"
    assert config_from(base).reporter is SILENT
    assert isinstance(config_from(base, progress=True).reporter, TqdmReporter)
    with pytest.raises(TypeError, match="mirror"):
        config_from(base, mirror=["http://typo/"])


def test_fetch_takes_its_settings_as_one_config(mirror_server, tmp_path, monkeypatch):
    refs = synth_refs(mirror_server.root, count=2, size=4096)
    monkeypatch.setenv("TVPACK_OFFLINE", "1")
    offline = Config(mirrors=(mirror_server.url,), upstream=False)  # offline: None reads TVPACK_OFFLINE at call time
    with pytest.raises(OfflineError):
        fetch(refs=refs, torch_home=tmp_path / "a", config=offline)
    assert mirror_server.requests() == []
    heard = Recorder()
    config = offline.but(offline=False, jobs=1, reporter=heard)
    paths = fetch(refs=refs, torch_home=tmp_path / "a", config=config)
    assert [p.name for p in paths] == [r.filename for r in refs]
    assert sum(bar.done for bar in heard.bars if bar.desc == "total") == sum(p.stat().st_size for p in paths)
    # the older keywords still work, and win over the config they are given with
    again = fetch(refs=refs, torch_home=tmp_path / "b", config=offline, offline=False)
    assert [p.name for p in again] == [r.filename for r in refs]
