"""The public Python API (``packager/__init__.py``): every name in ``packager.__all__`` works twice,
whatever was imported before, in a fresh interpreter each time.

A submodule sharing its name with a public function (``packager/bundle.py`` defines
``packager.bundle``) must never replace the function: the import system binds each submodule on its
package when it first loads it, so the order of imports is what these tests vary.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, ZOO_REGISTRY

pytestmark = pytest.mark.timeout(300)

# Uses every public name through the package attribute, once per call of use_all(). Each use is a real
# call with real data (the zoo through its own directory as a mirror), so a name that became a module,
# or a stale object, fails here.
SCENARIO = textwrap.dedent('''
    import json, os, sys, pkgutil, importlib
    from pathlib import Path

    ORDER, WORK, ZOO, REG = sys.argv[1], Path(sys.argv[2]), sys.argv[3], [sys.argv[4]]
    NAME = "zoo_shufflenet_v2"

    def import_every_submodule():
        import packager
        for info in pkgutil.walk_packages(packager.__path__, "packager."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)

    def use_all(packager, run):
        d = WORK / str(run)
        d.mkdir()
        home, used = d / "home", set()
        def use(name):
            used.add(name)
            return getattr(packager, name)
        assert use("__version__") == packager.__version__ and isinstance(packager.__version__, str)
        assert use("hub_dir")(home) == home / "hub"
        assert use("checkpoints_dir")(home) == home / "hub" / "checkpoints"
        catalog = use("get_catalog")(REG)
        assert isinstance(catalog, use("Catalog"))
        assert isinstance(use("get_registry")(REG), use("Registry"))
        refs = use("resolve")([NAME], registry=REG)
        assert all(isinstance(r, use("WeightsRef")) for r in refs)
        config = use("Config")(mirrors=(ZOO,), upstream=False)  # how calls move bytes, as one value
        assert use("fetch")([NAME], registry=REG, torch_home=home, config=config)
        assert use("ensure_cached")(refs, torch_home=home, mirrors=[ZOO], upstream=False)
        assert use("scan_cache")(torch_home=home, registry=REG).files
        assert all(r.ok for r in use("verify_cache")(torch_home=home, registry=REG))
        use("prune_cache")(torch_home=home, dry_run=True)
        lock = use("write_lockfile")([NAME], d / "tvpack.lock", registry=REG, torch_home=home, upstream=False)
        assert [r.name for r in use("read_lockfile")(lock)] == [r.name for r in refs]
        tar = use("bundle")([NAME], d / "a.tar", registry=REG, torch_home=home, upstream=False)
        tar2 = packager.bundle([NAME], d / "b.tar", registry=REG, torch_home=home, upstream=False)
        assert tar.read_bytes() == tar2.read_bytes()
        with use("open_bundle")(tar) as opened:
            assert opened.entries
        use("verify_bundle")(tar)
        assert use("install")(tar, torch_home=d / "site")
        use("install_bundle")(tar, torch_home=d / "site2")
        site = use("inventory")(torch_home=d / "site")
        use("write_inventory")(site, d / "SITE.json")
        assert use("read_site")(d / "SITE.json").checkpoints
        assert len(use("split_bundle")(tar, 1 << 20, d / "parts.tar")) > 1
        model, weights = use("load_model")(tar, NAME, registry=REG)
        assert use("load_weights")(tar, NAME, registry=REG).meta == weights.meta
        assert use("export_mirror")([NAME], to=str(d / "mirror"), registry=REG, torch_home=home, upstream=False)
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        (d / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        (d / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
        use("sign_bundle")(tar, use("Signer").load(d / "k.pem"))
        policy = use("trust_policy")([d / "k.pub"])
        assert isinstance(policy, use("TrustPolicy")) and policy
        use("verify_signed")(tar, policy)
        use("install_signed")(tar, policy, torch_home=d / "signed")
        assert use("remove_from_cache")([NAME], torch_home=home, registry=REG, dry_run=True)
        assert issubclass(use("errors").TvpackError, Exception)
        return used

    if ORDER == "submodules-first":
        import_every_submodule()
    import packager
    used = use_all(packager, 1)
    if ORDER == "submodules-between":
        import_every_submodule()
    use_all(packager, 2)
    print(json.dumps(sorted(used)))
''')


@pytest.mark.parametrize("order", ["api-first", "submodules-first", "submodules-between"])
def test_every_public_name_works_twice_whatever_was_imported_first(zoo_root, tmp_path, order):
    import packager

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "user"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-c", SCENARIO, order, str(tmp_path), str(zoo_root), ZOO_REGISTRY],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == sorted(packager.__all__)


def test_no_code_imports_a_submodule_under_a_public_name():
    """``from packager import bundle`` (or ``from . import bundle`` inside the package) names the public
    function, not the module: code that means the module must import from it instead."""
    import packager

    shadowed = {name for name in packager.__all__ if (ROOT / "packager" / f"{name}.py").exists()}
    offenders = []
    for path in [*(ROOT / "packager").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            top_package = (node.module == "packager" if node.level == 0 else
                           path.parent == ROOT / "packager" and node.level == 1 and not node.module) \
                if isinstance(node, ast.ImportFrom) else False
            if top_package and {alias.name for alias in node.names} & shadowed:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert shadowed and not offenders
