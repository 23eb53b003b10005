"""Every command block in the docs runs, as written, and what a page shows a command printing is what it prints.

A small harness of our own rather than sybil or pytest-codeblocks: a page is a session (its exports, its
``cd``, the loopback servers it starts with ``&`` and stops with ``kill``), so its blocks must run in one
shell, in order; pytest-codeblocks runs each block in a fresh process, and sybil would need a custom parser
and a persistent shell for ``console`` blocks, which is this file.

The rules a page follows (CONTRIBUTING.md repeats them):

- ```` ```console ````: lines starting with ``$ `` are commands (a trailing ``\\`` continues one onto the
  next line); the lines after one, up to the next ``$ ``, are what it prints (stdout then stderr, or
  stdout alone), checked. A command whose shown output holds ``tvpack: error:`` or ``"ok": false`` must
  fail; every other one must succeed. ``$?`` is the previous command's status, as in a terminal.
  ``...`` on a line of its own stands for any number of lines, and inside a line for any text.
- ```` ```sh ```` and ```` ```python ````: run, output not checked; the page fails if a command fails.
- a block preceded by ``<!-- reference -->`` is a reference snippet (it needs a real site: a real
  registry, bucket, cluster or download.pytorch.org) and is not run; the page says so next to it.
  ``yaml``, ``nginx``, ``dockerfile``, ``toml``, ``text`` and ``json`` blocks are files or listings, never run.

Each page runs in a fresh HOME, starting in it (with ``.venv`` there, as at the repository root after
``make install``); the synthetic zoo and the registry snapshot come from
the user's own cache (``XDG_CACHE_HOME``), so they are built once per machine. Outputs are compared
with HOME written as ``~`` and hex digests of 12 or more digits as ``<hex>``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
RUN = {"console", "sh", "python"}
NEVER_RUN = {"yaml", "nginx", "dockerfile", "toml", "text", "json", "ini", "python-reference"}
REFERENCE = "<!-- reference -->"
SHOWS_FAILURE = re.compile(r'tvpack: error:|"ok": false')  # shown output that says the command failed
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


# -- reading a page --------------------------------------------------------------------------------------
@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


@dataclass
class Block:
    lang: str
    body: str
    line: int
    commands: list[Command] = field(default_factory=list)  # console blocks


def parse_console(body: str, first_line: int) -> list[Command]:
    commands: list[Command] = []
    continuing = False
    for n, line in enumerate(body.splitlines(), first_line):
        if continuing:
            commands[-1].text += "\n" + line
            continuing = line.endswith("\\")
        elif line.startswith("$ "):
            commands.append(Command(line[2:], line=n))
            continuing = line.endswith("\\")
        elif commands:
            commands[-1].expected.append(line)
        elif line.strip():
            raise ValueError(f"line {n}: output before any command in a console block")
    return commands


def blocks_of(text: str) -> list[Block]:
    """The blocks to run, in page order; reference snippets and files left out."""
    found = []
    for match in FENCE.finditer(text):
        lang = match["lang"]
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == REFERENCE or lang in NEVER_RUN:
            continue
        if lang not in RUN:
            raise ValueError(f"line {line}: a ```{lang or '(no language)'} block: use console, sh or python to "
                             f"run it, or mark it {REFERENCE} (see tests/test_docs.py)")
        body = textwrap.dedent(match["body"])
        block = Block(lang, body, line)
        if lang == "console":
            block.commands = parse_console(body, line + 1)
        found.append(block)
    return found


# -- running it ------------------------------------------------------------------------------------------
def script_for(blocks: list[Block], state: Path) -> str:
    """One bash script for the page: sh/python blocks under ``set -e``, each console command's output and
    status captured to files."""
    out = ["set +e"]
    for i, block in enumerate(blocks):
        out.append(f"echo {i} > {state}/current")
        if block.lang == "sh":
            (state / f"b{i}.sh").write_text(block.body)
            out.append(f"set -e; . {state}/b{i}.sh > {state}/b{i}.log 2>&1 < /dev/null; set +e")
        elif block.lang == "python":
            (state / f"b{i}.py").write_text(block.body)
            out.append(f"set -e; python {state}/b{i}.py > {state}/b{i}.log 2>&1 < /dev/null; set +e")
        else:
            for j, command in enumerate(block.commands):
                out.append(f"{{\n{command.text}\n}} > {state}/c{i}_{j}.out 2> {state}/c{i}_{j}.err < /dev/null; "
                           f"__rc=$?; echo $__rc > {state}/c{i}_{j}.rc; (exit $__rc)")  # $? stays the command's
    out.append(f"echo done > {state}/current")
    return "\n".join(out) + "\n"


def normalise(text: str, home: Path) -> str:
    text = text.replace(str(home), "~")
    text = re.sub(r"\b[0-9a-f]{12,}\b", "<hex>", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _line_matches(expected: str, got: str) -> bool:
    if "..." not in expected:
        return expected == got
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("...")), got) is not None


def output_matches(expected: list[str], got: list[str]) -> bool:
    """doctest's ELLIPSIS, by lines: a line ``...`` matches any number of lines."""
    if not expected:
        return not got
    if expected[0].strip() == "...":
        return any(output_matches(expected[1:], got[k:]) for k in range(len(got) + 1))
    return bool(got) and _line_matches(expected[0], got[0]) and output_matches(expected[1:], got[1:])


def page_env(home: Path) -> dict:
    user_cache = os.environ.get("TVPACK_DOCS_CACHE") or os.path.expanduser("~/.cache")
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM", "CI", "TMPDIR", "USER")}
    return {**keep, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:"
                                               "/usr/sbin:/sbin",
            "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": user_cache, "TORCH_HOME": str(home / ".cache" / "torch"),
            "XDG_RUNTIME_DIR": str(home / "run"), "TVPACK_DOCS_REPO": str(ROOT)}


def run_page(page: Path, tmp: Path, *, timeout: float = 600) -> list[str]:
    """Run a page; the problems found, empty when every block ran and every shown output matched."""
    blocks = blocks_of(page.read_text())
    home, state = tmp / "home", tmp / "state"
    (home / "run").mkdir(parents=True)
    (home / ".venv").symlink_to(sys.prefix)  # pages start "from the repository root": `. .venv/bin/activate`
    state.mkdir()
    script = state / "page.sh"
    script.write_text(script_for(blocks, state))
    proc = subprocess.Popen(["bash", str(script)], cwd=home, env=page_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        shell_out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        shell_out = f"timed out after {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the page's background servers, if a kill was missed
        except ProcessLookupError:
            pass
        proc.wait()
    return check_results(blocks, state, home, page.name, shell_out)


def check_results(blocks: list[Block], state: Path, home: Path, name: str, shell_out: str) -> list[str]:
    problems = []
    reached = (state / "current").read_text().strip() if (state / "current").exists() else "-1"
    for i, block in enumerate(blocks):
        if block.lang != "console":
            if reached == str(i):
                log = (state / f"b{i}.log").read_text(errors="replace") if (state / f"b{i}.log").exists() else ""
                problems.append(f"{name}:{block.line}: the {block.lang} block failed:\n{log[-3000:]}{shell_out[-500:]}")
                break
            continue
        for j, command in enumerate(block.commands):
            rc_file = state / f"c{i}_{j}.rc"
            if not rc_file.exists():
                problems.append(f"{name}:{command.line}: not reached ({shell_out[-500:]})")
                return problems
            rc = int(rc_file.read_text())
            out, err = ((state / f"c{i}_{j}.{kind}").read_text(errors="replace") for kind in ("out", "err"))
            got = out + err if not out or out.endswith("\n") or not err else f"{out}\n{err}"
            expected = "\n".join(command.expected)
            if (rc != 0) != bool(SHOWS_FAILURE.search(expected)):
                problems.append(f"{name}:{command.line}: `{command.text}` exited {rc}:\n{got[-3000:]}")
            elif command.expected and not any(
                    output_matches(normalise(expected, home).splitlines(), normalise(text, home).splitlines())
                    for text in (got, out)):
                problems.append(f"{name}:{command.line}: `{command.text}` printed\n{normalise(got, home)}\n"
                                f"--- the page shows ---\n{normalise(expected, home)}")
    return problems


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, tmp_path):
    problems = run_page(ROOT / page, tmp_path)
    assert not problems, "\n\n".join(problems)


# -- the harness itself ----------------------------------------------------------------------------------
SAMPLE = """\
Intro.

```sh
export GREETING=hello
mkdir -p work && cd work
```

```console
$ echo "$GREETING $(basename "$PWD")"
hello work
$ printf 'a\\nb\\nc\\n'; echo 0123456789abcdef
a
...
<hex>
$ echo one \\
    two
one two
$ sh -c 'echo "tvpack: error: no" >&2; exit 3'
tvpack: error: no
$ echo $?
3
$ echo '{"ok": false}'; echo 'tvpack: error: no' >&2; false
{"ok": false}
```

<!-- reference -->
```sh
false   # never run: a reference snippet
```
"""


def test_harness_runs_a_page_in_one_shell_and_checks_outputs(tmp_path):
    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    assert run_page(page, tmp_path / "ok") == []

    page.write_text(SAMPLE.replace("hello work", "hello play"))
    (problem,) = run_page(page, tmp_path / "wrong")
    assert problem.startswith("sample.md:9: `echo \"$GREETING") and "hello work" in problem

    page.write_text(SAMPLE.replace("exit 3'", "exit 0'"))  # an error shown must be an error
    problem, status = run_page(page, tmp_path / "no-error")
    assert "exited 0" in problem and "`echo $?` printed\n0" in status

    page.write_text(SAMPLE.replace("export GREETING=hello", "false"))
    (problem,) = run_page(page, tmp_path / "failed")
    assert problem.startswith("sample.md:3: the sh block failed")

    page.write_text(SAMPLE + "\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="use console, sh or python"):
        blocks_of(page.read_text())


def test_mkdocs_builds_the_site_strictly(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves (make test runs it too)."""
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("mkdocs-material is required in CI (pip install -e '.[docs]')")
        pytest.skip("mkdocs-material not installed (pip install -e '.[docs]')")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_every_doc_link_resolves():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"
    for source in [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]:
        for target in re.findall(r"\]\((docs/[\w./-]+\.md)(?:#[\w-]+)?\)", source.read_text()):
            assert (ROOT / target).is_file(), f"{source.name} links to {target}, which does not exist"
