"""containers-registries.conf: finding the files, parsing them, and resolving a reference to the ordered
places to pull it from (mirrors, then the location) or push it to (the location). Pure: no server."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from packager.errors import OCIError
from packager.transport import registries as R

DIGEST = "sha256:" + "ab" * 32


def conf(text: str, source: str = "test.conf") -> R.RegistriesConf:
    return R.RegistriesConf(tuple(R.parse(textwrap.dedent(text), source)))


def pulls(c: R.RegistriesConf, name: str) -> list[tuple[str, bool, bool]]:
    """(endpoint, insecure, mirror) for ``host/repo[:tag][@digest]``."""
    host, repository, tag, digest = R._split(name)
    return [(str(e), e.insecure, e.mirror) for e in R.pull_endpoints(host, repository, tag, digest, conf=c)]


def push(c: R.RegistriesConf, name: str) -> tuple[str, bool]:
    host, repository, tag, digest = R._split(name)
    e = R.push_endpoint(host, repository, tag, digest, conf=c)
    return str(e), e.insecure


SITE = """
    [[registry]]
    prefix = "registry.example.com"
    location = "registry.example.com"

    [[registry.mirror]]
    location = "harbor.site.local/proxy-example"

    [[registry.mirror]]
    location = "127.0.0.1:5001"
    insecure = true

    [[registry]]
    prefix = "registry.example.com/models/private"
    location = "registry.example.com/models/private"

    [[registry]]
    prefix = "registry.example.com/old"
    location = "archive.example.com/kept/old"
    insecure = true

    [[registry]]
    prefix = "evil.example.org"
    blocked = true

    [[registry]]
    prefix = "*.corp.example"

    [[registry.mirror]]
    location = "spegel.local:30020"
    insecure = true
"""


# -- resolution ----------------------------------------------------------------------------------------
def test_nothing_configured_means_the_reference_itself():
    assert pulls(R.RegistriesConf(), "registry.example.com/models/small:v1") == [
        ("registry.example.com/models/small:v1", False, False)]
    assert pulls(conf(SITE), "other.example.net/x:v1") == [("other.example.net/x:v1", False, False)]


def test_mirrors_in_order_then_the_location_and_pushes_go_to_the_location_only():
    c = conf(SITE)
    assert pulls(c, "registry.example.com/models/small:v1") == [
        ("harbor.site.local/proxy-example/models/small:v1", False, True),
        ("127.0.0.1:5001/models/small:v1", True, True),
        ("registry.example.com/models/small:v1", False, False)]
    assert push(c, "registry.example.com/models/small:v1") == ("registry.example.com/models/small:v1", False)
    assert pulls(c, f"registry.example.com/models/small@{DIGEST}")[1] == (f"127.0.0.1:5001/models/small@{DIGEST}", True, True)


def test_the_longest_prefix_wins_and_its_location_rewrites_the_name():
    c = conf(SITE)
    # the longer prefix has no mirrors: straight to the location
    assert pulls(c, "registry.example.com/models/private/a:v1") == [("registry.example.com/models/private/a:v1", False, False)]
    assert pulls(c, "registry.example.com/models/private:v1") == [("registry.example.com/models/private:v1", False, False)]
    # a prefix matches at a path boundary only: private2 is the shorter prefix's
    assert [m for _, _, m in pulls(c, "registry.example.com/models/private2:v1")] == [True, True, False]
    assert pulls(c, "registry.example.com/old/resnet:v2") == [("archive.example.com/kept/old/resnet:v2", True, False)]
    assert push(c, "registry.example.com/old/resnet:v2") == ("archive.example.com/kept/old/resnet:v2", True)
    assert [m for _, _, m in pulls(c, "registry.example.com/older:v1")] == [True, True, False]


def test_a_host_prefix_does_not_match_the_same_host_on_another_port():
    c = conf(SITE)
    assert pulls(c, "registry.example.com:5000/models/small:v1") == [
        ("registry.example.com:5000/models/small:v1", False, False)]
    c = conf('[[registry]]\nprefix = "registry.example.com:5000"\ninsecure = true\n')
    assert pulls(c, "registry.example.com:5000/a:v1") == [("registry.example.com:5000/a:v1", True, False)]
    assert pulls(c, "registry.example.com/a:v1") == [("registry.example.com/a:v1", False, False)]


def test_a_repository_prefix_with_a_tag_or_digest():
    c = conf('''
        [[registry]]
        prefix = "example.com/models/small:v1"
        location = "pinned.example.com/small:frozen"
    ''')
    assert pulls(c, "example.com/models/small:v1") == [("pinned.example.com/small:frozen", False, False)]
    assert pulls(c, "example.com/models/small:v2") == [("example.com/models/small:v2", False, False)]
    c = conf('[[registry]]\nprefix = "example.com/models/small"\nlocation = "other.example.com/x"\n')
    assert pulls(c, f"example.com/models/small:v1@{DIGEST}") == [(f"other.example.com/x@{DIGEST}", False, False)]


def test_wildcard_prefixes_match_subdomains_only():
    c = conf(SITE)
    assert pulls(c, "a.corp.example/team/m:v1") == [("spegel.local:30020/team/m:v1", True, True),
                                                     ("a.corp.example/team/m:v1", False, False)]
    assert pulls(c, "b.a.corp.example:8443/m:v1")[-1] == ("b.a.corp.example:8443/m:v1", False, False)
    assert pulls(c, "b.a.corp.example:8443/m:v1")[0] == ("spegel.local:30020/m:v1", True, True)
    for name in ("corp.example/m:v1", "acorp.example/m:v1", "a.corp.example.evil.org/m:v1", "x.org/a.corp.example/m:v1"):
        assert pulls(c, name) == [(name, False, False)], name
    # a longer exact prefix beats the wildcard
    c = conf(SITE + '\n[[registry]]\nprefix = "a.corp.example/team"\nlocation = "a.corp.example/team"\n')
    assert pulls(c, "a.corp.example/team/m:v1") == [("a.corp.example/team/m:v1", False, False)]


@pytest.mark.parametrize("pull_from, by_tag, by_digest", [
    ("all", True, True), ("digest-only", False, True), ("tag-only", True, False), ("", True, True)])
def test_pull_from_mirror(pull_from, by_tag, by_digest):
    setting = f'pull-from-mirror = "{pull_from}"' if pull_from else ""
    c = conf(f'[[registry]]\nprefix = "r.example"\n[[registry.mirror]]\nlocation = "m.example"\n{setting}\n')
    assert len(pulls(c, "r.example/a:v1")) == 1 + by_tag
    assert len(pulls(c, f"r.example/a@{DIGEST}")) == 1 + by_digest
    assert len(pulls(c, f"r.example/a:v1@{DIGEST}")) == 1 + by_digest  # a digest is what is fetched


def test_mirror_by_digest_only_applies_to_every_mirror():
    c = conf('''
        [[registry]]
        prefix = "r.example"
        mirror-by-digest-only = true
        [[registry.mirror]]
        location = "m1.example"
        [[registry.mirror]]
        location = "m2.example"
    ''')
    assert pulls(c, "r.example/a:v1") == [("r.example/a:v1", False, False)]
    assert [e for e, _, _ in pulls(c, f"r.example/a@{DIGEST}")] == [f"m1.example/a@{DIGEST}", f"m2.example/a@{DIGEST}",
                                                                       f"r.example/a@{DIGEST}"]


def test_blocked_registries_refuse_pull_and_push_in_one_line():
    c = conf(SITE, "/etc/containers/registries.conf")
    for call in (pulls, push):
        with pytest.raises(OCIError) as err:
            call(c, "evil.example.org/models/x:v1")
        assert err.value.message == ("evil.example.org/models/x:v1: registry evil.example.org is blocked in "
                                     "/etc/containers/registries.conf")
        assert "\n" not in err.value.message


def test_a_location_without_prefix_is_its_own_prefix_and_trailing_slashes_go():
    c = conf('[[registry]]\nlocation = "r.example/ns/"\ninsecure = true\n[[registry.mirror]]\nlocation = "m.example/x/"\n')
    assert pulls(c, "r.example/ns/a:v1") == [("m.example/x/a:v1", False, True), ("r.example/ns/a:v1", True, False)]


# -- parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("[[registry]\n", "not valid TOML"),
    ("[[registry]]\ninsecure = true\n", "neither prefix nor location"),
    ('[[registry]]\nlocation = "https://r.example"\n', "no URI scheme"),
    ('[[registry]]\nprefix = "r.example"\ninsecure = "yes"\n', "insecure must be true or false"),
    ('[[registry]]\nprefix = "r.example"\n[[registry.mirror]]\ninsecure = true\n', "a mirror has no location"),
    ('[[registry]]\nprefix = "r.example"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "some"\n',
     "pull-from-mirror 'some' is not one of all, digest-only, tag-only"),
    ('[[registry]]\nprefix = "r.example"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m"\n'
     'pull-from-mirror = "all"\n', "cannot both be set"),
    ('[[registry]]\nprefix = "*.r.example"\nlocation = "x.example"\n', "a wildcard prefix takes no location"),
    ('[[registry]]\nprefix = "*.r.example/ns"\n', "a wildcard prefix is *.domain"),
    ('[[registry]]\nprefix = "r.*.example"\n', "only as the leading label"),
    ('[[registry]]\nprefix = "r.example"\n[[registry]]\nprefix = "r.example"\n', "prefix r.example is defined twice"),
    ('[[registry]]\nprefix = "a"\nlocation = "r.example"\n[[registry]]\nprefix = "b"\nlocation = "r.example"\n'
     'insecure = true\n', "defined twice with different insecure or blocked"),
    ('registry = "x"\n', "array of tables"),
    ('[registries.insecure]\nregistries = ["a"]\n[[registry]]\nprefix = "b"\n', "mixes v1"),
    ('[registries.block]\nregistries = "a"\n', "must be a list of strings"),
])
def test_malformed_files_are_refused_in_one_line_naming_the_file(text, expected):
    with pytest.raises(OCIError, match="^/etc/x.conf: .*" + expected.replace("*", r"\*").replace("(", r"\(")) as err:
        R.parse(text, "/etc/x.conf")
    assert "\n" not in err.value.message


def test_settings_for_short_names_are_left_alone():
    c = conf('''
        unqualified-search-registries = ["docker.io"]
        short-name-mode = "enforcing"
        credential-helpers = ["containers-auth.json"]
        [aliases]
        "busybox" = "docker.io/library/busybox"
        [[registry]]
        prefix = "r.example"
        location = "r.example"
        some-future-key = 1
    ''')
    assert [r.prefix for r in c.registries] == ["r.example"]


def test_v1_insecure_and_block_lists():
    c = conf('''
        [registries.search]
        registries = ["docker.io"]
        [registries.insecure]
        registries = ["127.0.0.1:5000", "both.example"]
        [registries.block]
        registries = ["both.example"]
    ''')
    assert pulls(c, "127.0.0.1:5000/a:v1") == [("127.0.0.1:5000/a:v1", True, False)]
    with pytest.raises(OCIError, match="blocked"):
        pulls(c, "both.example/a:v1")


# -- finding the files ---------------------------------------------------------------------------------
@pytest.fixture
def homes(tmp_path, monkeypatch):
    """HOME and XDG_CONFIG_HOME in tmp, the system paths moved into tmp too."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    system = tmp_path / "etc"
    (system / "registries.conf.d").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    monkeypatch.setattr(R, "SYSTEM_CONF", system / "registries.conf")
    monkeypatch.setattr(R, "SYSTEM_DROP_INS", system / "registries.conf.d")
    return home, system


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def entry(prefix: str, mirror: str | None = None) -> str:
    text = f'[[registry]]\nprefix = "{prefix}"\n'
    return text + (f'[[registry.mirror]]\nlocation = "{mirror}"\n' if mirror else "")


def test_file_lookup_order(homes, tmp_path, monkeypatch):
    home, system = homes
    assert R.config_files() == [] and R.load().registries == ()
    sys_conf = write(system / "registries.conf", entry("r.example", "system-mirror"))
    assert R.config_files() == [sys_conf]
    user_conf = write(home / ".config/containers/registries.conf", entry("r.example", "user-mirror"))
    assert R.config_files() == [user_conf]
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert R.config_files() == [sys_conf]  # the user's file is under XDG_CONFIG_HOME now: none there
    xdg_conf = write(xdg / "containers/registries.conf", entry("r.example", "xdg-mirror"))
    assert R.config_files() == [xdg_conf]
    explicit = write(tmp_path / "explicit.conf", entry("r.example", "explicit-mirror"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(explicit))
    assert R.config_files() == [explicit]
    assert pulls(R.load(), "r.example/a:v1")[0][0] == "explicit-mirror/a:v1"
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", "")  # set but empty: unset
    assert R.config_files() == [xdg_conf]


def test_drop_ins_are_merged_in_name_order_and_replace_by_prefix(homes, tmp_path, monkeypatch):
    home, system = homes
    main = write(system / "registries.conf", entry("r.example", "main-mirror") + entry("s.example", "s-mirror"))
    b = write(system / "registries.conf.d/20-b.conf", entry("r.example", "b-mirror"))
    a = write(system / "registries.conf.d/10-a.conf", entry("r.example", "a-mirror") + entry("t.example", "t-mirror"))
    write(system / "registries.conf.d/README", "not toml [")
    write(system / "registries.conf.d/30-dir.conf/x.conf", entry("r.example", "nested"))
    user_d = write(home / ".config/containers/registries.conf.d/50-user.conf", entry("u.example", "u-mirror"))
    assert R.config_files() == [main, a, b, user_d]
    c = R.load()
    assert pulls(c, "r.example/x:v1")[0][0] == "b-mirror/x:v1"  # the last definition of a prefix wins
    assert pulls(c, "s.example/x:v1")[0][0] == "s-mirror/x:v1"
    assert pulls(c, "t.example/x:v1")[0][0] == "t-mirror/x:v1"
    assert pulls(c, "u.example/x:v1")[0][0] == "u-mirror/x:v1"
    # CONTAINERS_REGISTRIES_CONF replaces the main file; the drop-ins still apply, as for podman
    explicit = write(tmp_path / "explicit.conf", entry("s.example", "explicit-mirror"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(explicit))
    assert R.config_files() == [explicit, a, b, user_d]
    # a user's own registries.conf replaces the system's and its drop-ins
    user = write(home / ".config/containers/registries.conf", entry("v.example", "v-mirror"))
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF")
    assert R.config_files() == [user, user_d]


def test_an_unreadable_file_is_one_line(homes, tmp_path, monkeypatch):
    bad = write(tmp_path / "bad.conf", "")
    bad.write_bytes(b"\xff\xfe")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(bad))
    with pytest.raises(OCIError, match=f"^{bad}: cannot read this registries.conf"):
        R.load()
    bad.write_text("[[registry]]\nprefix = 1\n")
    with pytest.raises(OCIError, match=f"^{bad}: prefix must be a string"):
        R.load()
