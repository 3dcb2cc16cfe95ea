"""README.md and docs/ cannot silently rot (framework-free, fast).

- every `--option` they name exists: in the `--help` of the command it is given to (a `python -m compare.X`
  or `tox -e run|study|bench --` command line), or, named on its own, in one of those commands or the
  test suite's own pytest options; other tools' options only where that tool's command is on the line;
- every study they name is a file in studies/;
- every relative link and image resolves, a link's #anchor to a heading of its file;
- README's test command is what .ci/run runs, word for word (it reads it from README), and both commands
  set tox up in a virtual environment, which a system pip that refuses installs (PEP 668) cannot stop.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "reference").glob("*.md"))
COMMANDS = {
    "run": "compare.run",
    "study": "compare.study",
    "bench": "compare.bench",
    "report": "compare.report",
    "port": "compare.port",
}
# other tools' commands: an option on the same line as one of these is that tool's, not ours
OTHER_TOOLS = ("ray start", "mlflow ", "--notest", "pip install", "apt-get")
# options of other tools named on their own in prose, each with what it is
EXTERNAL = {"--xla_gpu_deterministic_ops": "an XLA flag, set through XLA_FLAGS"}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
COMMAND = re.compile(
    r"(?:python3? -m compare\.(run|study|bench|report|port)|tox -e (run|study|bench|port) --)(?![\w.])"
)


@pytest.fixture(scope="module")
def help_options():
    """command -> the options its --help lists."""
    out = {}
    for name, module in COMMANDS.items():
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        out[name] = set(OPTION.findall(proc.stdout))
    return out


def pytest_options():
    text = (ROOT / "tests" / "conftest.py").read_text()
    return set(re.findall(r'addoption\(\s*"(--[a-z-]+)"', text))


def doc_lines(path: Path):
    """(line number, line) of a doc, with each code block's lines and each paragraph's joined lines (a
    command or an option can wrap)."""
    text = path.read_text()
    blocks, current, start = [], [], 1
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("```"):
            if current:
                blocks.append((start, " ".join(current)))
            current, start = [], number + 1
            continue
        if not current:
            start = number
        current.append(line.strip())
    if current:
        blocks.append((start, " ".join(current)))
    return blocks


def option_problems(path: Path, help_options: dict, known_pytest: set) -> list:
    everything = set().union(*help_options.values()) | known_pytest | set(EXTERNAL)
    problems = []
    for number, line in doc_lines(path):
        for span in re.findall(r"`([^`]+)`", line) or [line]:
            for piece in re.split(r"&&|;", span):  # one command at a time
                match = COMMAND.search(piece)
                if match:
                    command = match.group(1) or match.group(2)
                    for option in OPTION.findall(piece[match.end() :]):
                        if option not in help_options[command]:
                            problems.append(
                                f"{path.name}:{number}: {option} is not an option of {COMMANDS[command]} (--help)"
                            )
                    continue
                if any(tool in piece for tool in OTHER_TOOLS):
                    continue
                for option in OPTION.findall(piece):
                    if option.split("=")[0] not in everything:
                        problems.append(
                            f"{path.name}:{number}: {option} is no option of compare.run, study, "
                            f"bench, report or the tests"
                        )
    return problems


def test_every_option_the_docs_name_exists(help_options):
    problems = [p for path in DOCS for p in option_problems(path, help_options, pytest_options())]
    assert not problems, "\n".join(problems)


def study_names(path: Path) -> set:
    text = path.read_text()
    named = set(re.findall(r"(?:compare\.study|tox -e study --)\s+([a-z][a-z0-9-]*)(?![\w.-])", text))  # not FILE.toml
    named |= (
        set(re.findall(r"^\| `([a-z][a-z0-9-]*)` \|", text, flags=re.M))
        if "## Studies" in text or path.name == "studies.md"
        else set()
    )
    return named - {"list"}


def test_every_study_the_docs_name_exists():
    shipped = {p.stem for p in (ROOT / "studies").glob("*.toml")}
    missing = {f"{path.name}: {name}" for path in DOCS for name in study_names(path) if name not in shipped}
    assert not missing, f"studies named but not in studies/: {sorted(missing)}"
    assert study_names(ROOT / "docs" / "studies.md") >= shipped  # the guide names every shipped study


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    in_code, out = False, set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def link_problems(path: Path) -> list:
    problems = []
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links in code blocks are code
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            problems.append(f"{path.name}: {target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{path.name}: {target}: no heading #{anchor} in {resolved.name}")
    return problems


def test_every_relative_link_and_image_resolves():
    problems = [p for path in DOCS for p in link_problems(path)]
    assert not problems, "\n".join(problems)
    readme = (ROOT / "README.md").read_text()
    guides = sorted((ROOT / "docs").glob("*.md"))
    missing = [p.name for p in guides if f"](docs/{p.name})" not in readme]
    assert not missing and "](docs/reference/README.md)" in readme, f"the front page links every guide: {missing}"
    index = (ROOT / "docs" / "reference" / "README.md").read_text()
    pages = [p.name for p in (ROOT / "docs" / "reference").glob("*.md") if p.name != "README.md"]
    assert all(f"]({name})" in index for name in pages), "the reference's index links every reference page"
    assert len(readme) <= 10_000, f"README.md is {len(readme)} characters; the front page stays within 10,000"


def readme_commands() -> tuple:
    """The shell commands under README's "Run the comparison" and "Run the tests"."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) >= 2 and text.index("Run the comparison") < text.index("Run the tests")
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_readmes_test_command_as_written():
    """.ci/run takes README's test command from README itself (`--print` shows it): the same words, less the
    `sudo` a root shell leaves out; it installs what the comparison command installs, and sets tox up in a
    virtual environment, where a system pip that refuses installs (PEP 668) cannot stop it."""
    compare_cmd, test_cmd = readme_commands()
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True
    ).stdout.strip()
    root_without_sudo = os.geteuid() == 0 and not shutil.which("sudo")  # .ci/run drops `sudo` only then
    assert printed.split() == [w for w in test_cmd.split() if w != "sudo" or not root_without_sudo]
    for cmd in (compare_cmd, test_cmd):
        assert "python3 -m venv .venv" in cmd and ".venv/bin/pip install 'tox>=4'" in cmd
        assert not re.search(r"(^|&& )(sudo )?(python3 -m )?pip install", cmd), "a system pip install (PEP 668)"

    def packages(cmd):
        return set(re.search(r"apt-get install -y ([\w+ -]+?) &&", cmd).group(1).split())

    assert packages(compare_cmd) <= packages(test_cmd), "the tests install what the comparison command installs"
    assert compare_cmd.endswith(".venv/bin/tox -e run -- --frameworks torch,mxnet") and test_cmd.endswith(
        ".venv/bin/tox"
    )


@pytest.mark.parametrize("module", ["run", "study", "bench", "report"])
def test_every_option_has_help_and_says_its_default_once(module):
    """Every option of every command explains itself; a default is said once (not "default 10 (default:
    None)"), and never as None."""
    import importlib

    parser = importlib.import_module(f"compare.{module}").build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            assert action.help and action.help.strip(), f"compare.{module} {action.option_strings[0]} has no help"
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    for chunk in re.split(r"(?=\s--[a-z])", flat):  # each option's entry: one "default" at the most
        assert len(re.findall(r"\(default[: ]", chunk)) <= 1, chunk


CHEAP = re.compile(r"`((?:\.venv/bin/)?tox -e (run|study|bench) -- ([^`]*?--(?:help|list|dry-run)[^`]*))`")


def cheap_commands() -> list:
    """(file, command as written, module, arguments) of every cheap command a guide shows: --help, --list,
    --dry-run through tox."""
    found = []
    for path in DOCS:
        text = " ".join(path.read_text().split())  # a command may wrap across lines
        for whole, env, args in CHEAP.findall(text):
            found.append((path.name, whole, COMMANDS[env], args.split()))
    return found


def test_cheap_commands_in_the_guides_run_as_written():
    """Each runs, with the arguments as written, as its tox env runs it (tox.ini: `python -m compare.X
    {posargs}`), and prints something; none fails or is unknown."""
    tox = (ROOT / "tox.ini").read_text()
    commands = cheap_commands()
    assert {c[1] for c in commands} >= {"tox -e run -- --help", "tox -e study -- --list"}, commands
    for name, written, module, args in commands:
        assert f"commands = python -m {module} {{posargs}}" in tox, f"{name}: {written}: tox.ini runs it otherwise"
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and proc.stdout.strip(), f"{name}: `{written}` failed:\n{proc.stderr[-2000:]}"


def test_nothing_points_outside_the_repository():
    """Specs live in docs/ and docstrings: no file refers to design notes kept outside the repository."""
    outside = re.compile(r"\b(DESIGN|CONVENTIONS|STYLE)\.md\b|\.\./shared\b")
    files = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".md", ".ini", ".toml", ".txt", "")
        and not any(part.startswith(".") and part not in (".ci",) for part in p.relative_to(ROOT).parts)
        and "__pycache__" not in p.parts
        and p.stat().st_size < 1_000_000
        and "reports" not in p.parts
    ]
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits


MEASURED = re.compile(r"<!-- measured: ([\w-]+) -->(.*?)<!-- /measured -->", re.S)
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?%?")


def test_quoted_figures_come_from_generated_excerpts():
    """Each docs/measured/NAME/excerpt.md is what its committed records give (regenerated here), and every
    number a guide quotes inside a `<!-- measured: NAME -->` passage is in that excerpt."""
    from compare.reporting.excerpt import excerpt

    measured = sorted((ROOT / "docs" / "measured").iterdir())
    assert measured, "docs/measured holds at least the quick start's records"
    for folder in measured:
        assert (folder / "excerpt.md").read_text() == excerpt(folder), (
            f"{folder.name}/excerpt.md is not what its committed records give. The records did not change, so the "
            "code that turns records into figures or sentences did: a changed figure is a change of behaviour. "
            "Find which change moved it and say why it is right (in the commit and, where a guide quotes it, the "
            "guide) before regenerating, or the regeneration writes a bug into the docs: "
            f"`python -m compare.reporting.excerpt docs/measured/{folder.name}`"
        )
    passages = [(path.name, name, text) for path in DOCS for name, text in MEASURED.findall(path.read_text())]
    assert any(name == "quick-start" for _, name, _ in passages), "README quotes the quick start's excerpt"
    for doc, name, text in passages:
        quoted = (ROOT / "docs" / "measured" / name / "excerpt.md").read_text()
        missing = [n for n in NUMBER.findall(" ".join(text.split())) if n not in quoted]
        assert not missing, f"{doc}: numbers quoted from {name} that its excerpt does not hold: {missing}"


def test_every_answer_block_is_what_its_records_give():
    """Every `<!-- answer: NAME -->` (or `NAME#PART` of a port) block of the guides is exactly what
    docs/measured/NAME's committed records give (compare.reporting.excerpt.answer_block): no number in it is
    typed. docs/answers.md answers the chapter's questions with at least ten of them."""
    from compare.reporting.excerpt import ANSWER, answer_block

    answers = ANSWER.findall((ROOT / "docs" / "answers.md").read_text())
    assert len(answers) >= 10, "the chapter's questions each have a measured answer"
    for path in DOCS:
        for _, name, part, text, _ in ANSWER.findall(path.read_text()):
            assert text == answer_block(ROOT / "docs" / "measured" / name, part or "fold"), (
                f"{path.name}'s {name} block is not what its records give: a changed figure is a change of "
                f"behaviour to explain first; then `python -m compare.reporting.excerpt --answers docs/{path.name}`"
            )


def png_size(path: Path) -> tuple:
    """(width, height) in pixels, from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_every_image_is_drawn_from_committed_records_by_todays_code():
    """Each image a guide shows is in docs/images/manifest.json, made by `python -m compare.reporting.images` from a
    docs/measured folder whose records hash as they did then, by plotting code that hashes as it does now; at most
    1,600 px wide (100 dpi) and six panels."""
    from compare.reporting import images

    manifest = __import__("json").loads((ROOT / "docs" / "images" / "manifest.json").read_text())
    shown = {Path(m).name for path in DOCS for m in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", path.read_text())}
    assert shown, "the guides show images"
    code = images.code_digest()
    for name in sorted(shown):
        assert name in manifest, f"{name} is shown but no command in the manifest made it"
        made = manifest[name]
        source = ROOT / made["source"]
        assert source.is_dir(), f"{name}: its records ({made['source']}) are not committed"
        assert made["inputs"] == images.inputs_digest(source), f"{name}: its records changed since it was drawn"
        assert made["code"] == code, f"{name}: the plotting code changed since it was drawn; `{made['command']}`"
        width, _ = png_size(ROOT / "docs" / "images" / name)
        assert width <= 1600 and made.get("panels", 1) <= 6, (name, width, made.get("panels"))


# The learner's guides (docs/reference/ holds the porter's and contributor's detail), in reading order: a term is
# first met in the first of them that uses it.
READING = ["README.md"] + [
    f"docs/{name}.md"
    for name in (
        "first-hour",
        "answers",
        "running",
        "studies",
        "why-bn",
        "population",
        "normalisations",
        "data-parallel",
        "precision",
        "benchmark",
    )
]
HALF_HOUR = ["README.md"] + [f"docs/{n}.md" for n in ("first-hour", "running", "answers", "why-bn", "population")]
HALF_HOUR += ["docs/normalisations.md"]
WORDS_PER_MINUTE = 230  # a careful reader of technical prose
GENERATED = re.compile(r"<!-- (answer: [\w#-]+|durations) -->.*?<!-- /(answer|durations) -->", re.S)


def prose(text: str, generated: bool = True) -> str:
    """What a reader reads of a guide: no code blocks, tables, images or comments; the generated answers' sentences
    kept (generated=True) or left out (they are not the guide's own words)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    if not generated:
        text = GENERATED.sub("", text)
        text = MEASURED.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    skip = ("|", "![", "#") if generated else ("|", "![", "#", ">")  # a quotation's words are not the guide's
    keep = [line for line in text.splitlines() if not line.lstrip().startswith(skip)]
    return "\n".join(keep)


def words(path: str) -> int:
    return len(prose((ROOT / path).read_text()).split())


def test_a_learner_reads_the_guides_in_half_an_hour():
    """README and the guides a learner needs (first hour, running, answers, why-bn, population, normalisations),
    generated answers included, read in 30 minutes; every learner's guide together stays under 10,000 words (the
    detail lives in docs/reference/)."""
    half_hour = {path: words(path) for path in HALF_HOUR}
    assert sum(half_hour.values()) <= 30 * WORDS_PER_MINUTE, half_hour
    learner = ["README.md"] + [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))]
    assert sum(words(path) for path in learner) <= 10_000, {path: words(path) for path in learner}


def glossary_terms() -> dict:
    """anchor -> the words that name it in prose (its heading, and the short forms the glossary gives)."""
    text = (ROOT / "docs" / "glossary.md").read_text()
    terms = {slug(h): [h] for h in re.findall(r"^## (.+)$", text, flags=re.M)}
    aliases = {"running-average": ["EMA"], "internal-covariate-shift": ["ICS"], "beta-smoothness": ["β-smoothness"]}
    for anchor, more in aliases.items():
        terms[anchor] += more
    return terms


def test_every_glossary_term_is_linked_where_a_reader_first_meets_it():
    """For each glossary term, its first use in the guides (the learner's in reading order, then the reference's;
    outside code, tables, headings, quotations and generated text) is a link to its glossary entry."""
    problems = []
    reference = [f"docs/reference/{p.name}" for p in sorted((ROOT / "docs" / "reference").glob("*.md"))]
    for anchor, names in glossary_terms().items():
        spelled = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in names)  # a name may wrap a line
        pattern = re.compile(r"(?<![\w-])(" + spelled + r")(?:s|es)?(?![\w-])", re.I)
        for path in READING + reference:
            text = re.sub(r"`[^`]*`", "", prose((ROOT / path).read_text(), generated=False))
            found = pattern.search(text)
            if not found:
                continue
            start = text.rfind("[", 0, found.start())
            link = re.match(r"\[[^\]]*\]\(([^)]*)\)", text[start:]) if start >= 0 else None
            if not (link and start + link.end() > found.end() and link.group(1).endswith(f"glossary.md#{anchor}")):
                line = text[: found.start()].count("\n") + 1
                problems.append(f"{path}: '{found.group(0)}' (prose line {line}) is not linked to glossary.md#{anchor}")
            break
        else:
            problems.append(f"glossary term {names[0]!r} is used in no guide")
    assert not problems, "\n".join(problems)
