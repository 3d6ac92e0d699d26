"""The README's examples, run as tests.

README.md is parsed when the tests are collected, so a block added to it later is
tested too. Each test id is the nearest preceding heading plus the block's index under
that heading (``Use-2``); every failure message names the block by heading, README line
and first line.

* Every fenced ```python block runs in a fresh namespace, in a temporary working
  directory, offline:

  - files a block reads are provided honestly by a fixture: ``torch.load("torchvision_<arch>.pth")``
    finds a seeded random torchvision ``<arch>`` state_dict in the working directory, and
    every pretrained weight a block names (``<arch>(weights="IMAGENET1K_V2")``,
    ``ResNet50_Weights.IMAGENET1K_V2``) is a seeded random state_dict of torchvision's
    ``<arch>`` at ``$TORCH_HOME/hub/checkpoints/<basename of the weights' url>``, where
    torchvision's loader looks. ``torch.hub.download_url_to_file`` raises, so a cache miss
    fails loudly instead of downloading. Only the ResNet family (the factories of
    ``resnet_fast.models.weights.WEIGHTS_ENUMS``) is provided.
  - a block that is a fragment (it uses names the README defines only in prose or in
    another block) gets an explicit preamble from ``PREAMBLES`` below, keyed by a
    distinctive line of the block. The names a block uses without defining them are found
    statically (``symtable``), before it runs; a block that needs names and has no preamble
    entry, or whose entry leaves some out, fails with a message saying what to add here.
  - a comment stating an equivalence, ``# == <expression>`` (continued on following comment
    lines), is checked numerically: right after the statement it annotates runs, the
    expression is evaluated in the block's namespace (with ``F = torch.nn.functional`` and
    ``torch`` available if the block did not define them) and compared with the value the
    statement assigned, with ``torch.testing.assert_close``.

* Every ``resnet-fast <subcommand>`` (or ``-m resnet_fast.cli <subcommand>``) in a
  ```bash block, or on a ``$ `` prompt line of a ```text block, exists: ``resnet-fast <subcommand> --help`` exits 0 and lists
  every ``--option`` the README passes to it, and the ``resnet-fast`` console script is
  registered as ``resnet_fast.cli:main``. The ``--help`` runs call that function in this
  process (what the console script runs). Nothing is trained or benchmarked.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib.metadata
import re
import symtable
import textwrap
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from tests.fixtures import checkpoint_path, offline_torch_hub

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
TEXT_LANGS = {"text", ""}  # only their ``$ command`` lines count, as shell commands


# --------------------------------------------------------------------------- README parsing


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    heading: str
    index: int  # 1-based, among the blocks of the same kind under the same heading
    line: int  # README line of the first line of code (after the opening fence)
    code: str

    @property
    def test_id(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9.]+', '-', self.heading).strip('-') or 'top'}-{self.index}"

    @property
    def label(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "<empty>")
        return f"README.md block {self.index} under '{self.heading}' (line {self.line}: {first!r})"


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<title>.*?)\s*#*\s*$")


def _kind(info: str) -> Optional[str]:
    lang = info.lower()
    if lang in PYTHON_LANGS:
        return "python"
    return "shell" if lang in SHELL_LANGS else "text" if lang in TEXT_LANGS else None


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a markdown text, with their nearest preceding heading."""
    blocks: list[Block] = []
    heading = "top"
    counts: dict[tuple[str, str], int] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            title = _HEADING.match(lines[i])
            if title:
                heading = title.group("title")
            i += 1
            continue
        fence = opening.group("fence")
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body_start = i + 1
        j = body_start
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        kind = _kind(opening.group("info"))
        if kind is not None:
            key = (kind, heading)
            counts[key] = counts.get(key, 0) + 1
            blocks.append(Block(kind, heading, counts[key], body_start + 1,
                                textwrap.dedent("\n".join(lines[body_start:j])) + "\n"))
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang == "shell"]
TEXT_BLOCKS = [b for b in BLOCKS if b.lang == "text"]


def test_readme_has_examples() -> None:
    assert PYTHON_BLOCKS, "README.md has no ```python block: the parser (or the README) is broken"
    assert SHELL_BLOCKS, "README.md has no ```bash block: the parser (or the README) is broken"


# --------------------------------------------------------------------------- fragment preambles


@dataclasses.dataclass(frozen=True)
class Preamble:
    """Definitions for the free names of one README fragment: ``make()`` returns them by name."""

    doc: str
    make: Callable[[], dict[str, Any]]


def _conv_bn_act_inputs() -> dict[str, Any]:
    """A 3x3, 64 -> 64 unit on a (2, 64, 16, 16) input, with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(20240601)
    channels = 64
    return {
        "x": torch.randn(2, channels, 16, 16, generator=g),
        "conv_weight": torch.randn(channels, channels, 3, 3, generator=g) * (2.0 / (channels * 9)) ** 0.5,
        "bn_weight": torch.rand(channels, generator=g) + 0.5,
        "bn_bias": torch.randn(channels, generator=g) * 0.1,
        "running_mean": torch.randn(channels, generator=g) * 0.1,
        "running_var": torch.rand(channels, generator=g) + 0.5,
        "identity": torch.randn(2, channels, 16, 16, generator=g),  # padding=1, stride 1: same shape as out
    }


# Key: one line of the block (compared stripped), distinctive enough to find exactly that block.
# Value: what the fragment assumes from its surroundings. Add an entry here when a README block
# uses names it does not define; define exactly the names the block uses and no others.
PREAMBLES: dict[str, Preamble] = {
    "out = conv_bn_act(x, conv_weight, bn_weight, bn_bias, running_mean, running_var,": Preamble(
        doc="the functional example: the input x, the conv weight and BN parameters / running stats of one "
            "64-channel 3x3 unit, and the residual identity",
        make=_conv_bn_act_inputs,
    ),
}


def _preamble_for(block: Block) -> tuple[Optional[str], Optional[Preamble]]:
    lines = {ln.strip() for ln in block.code.splitlines()}
    keys = [key for key in PREAMBLES if key.strip() in lines]
    if len(keys) > 1:
        pytest.fail(f"{block.label}: matches several PREAMBLES keys in {__file__}: {keys}; make them distinctive",
                    pytrace=False)
    return (keys[0], PREAMBLES[keys[0]]) if keys else (None, None)


def free_names(code: str) -> set[str]:
    """Names the code reads (at top level or from any nested scope) and never binds at top level."""
    top = symtable.symtable(code, str(README), "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used = {s.get_name() for s in top.get_symbols() if s.is_referenced()}

    def visit(table: symtable.SymbolTable) -> None:
        for child in table.get_children():
            for sym in child.get_symbols():
                if sym.is_global() or (sym.is_free() and table is top):
                    used.add(sym.get_name())
            visit(child)

    visit(top)
    return {name for name in used - bound if not hasattr(builtins, name)}


def test_every_preamble_matches_a_block() -> None:
    """A preamble whose key line left the README is stale: update its key (or delete it)."""
    lines = {ln.strip() for b in PYTHON_BLOCKS for ln in b.code.splitlines()}
    stale = [key for key in PREAMBLES if key.strip() not in lines]
    assert not stale, f"PREAMBLES keys in {__file__} found in no ```python block of README.md: {stale}"


# --------------------------------------------------------------------------- offline checkpoints


@functools.lru_cache(maxsize=None)
def _random_torchvision_state(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    """A seeded random state_dict of torchvision's ``arch`` (the same one every time)."""
    import torchvision

    fork_rng = torch.random.fork_rng(devices=[])
    with fork_rng:
        torch.manual_seed(1234)
        return getattr(torchvision.models, arch)(num_classes=num_classes).state_dict()


_WEIGHTS_ARG = re.compile(r"\b(?P<arch>\w+)\(\s*(?:[^()]*?,\s*)?weights\s*=\s*(?P<q>[\"'])(?P<name>[\w.]+)(?P=q)")
_WEIGHTS_ENUM = re.compile(r"\b(?P<enum>\w+_Weights)\.(?P<member>[A-Z][A-Z0-9_]*)\b")
_TORCHVISION_FILE = re.compile(r"[\"'](?P<file>torchvision_(?P<arch>\w+)\.pth)[\"']")


def _weights_named(block: Block) -> list[Any]:
    """Every torchvision weights enum member the block names, resnet family only."""
    from torchvision import models as tv_models

    from resnet_fast.models.weights import WEIGHTS_ENUMS, weights_enum

    found = []
    for m in _WEIGHTS_ARG.finditer(block.code):
        arch = m.group("arch")
        if arch not in WEIGHTS_ENUMS:
            pytest.fail(f"{block.label}: {arch}(weights={m.group('name')!r}): {__file__} provides checkpoints "
                        f"only for the ResNet family {sorted(WEIGHTS_ENUMS)}", pytrace=False)
        found.append(weights_enum(arch).verify(m.group("name")))
    enum_to_arch = {enum: arch for arch, enum in WEIGHTS_ENUMS.items()}
    for m in _WEIGHTS_ENUM.finditer(block.code):
        if m.group("enum") not in enum_to_arch:
            pytest.fail(f"{block.label}: {m.group(0)}: {__file__} provides checkpoints only for the ResNet "
                        f"family {sorted(enum_to_arch)}", pytrace=False)
        found.append(getattr(tv_models, m.group("enum"))[m.group("member")])
    return found


@pytest.fixture
def offline_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Block], list[str]]:
    """``prepare(block)``: cwd and TORCH_HOME in tmp_path, no downloads, the block's files written there."""
    cwd, torch_home = tmp_path / "cwd", tmp_path / "torch_home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    checkpoints = offline_torch_hub(monkeypatch, torch_home, "the README test prepares checkpoints only for "
                                    f"the weights a block names literally (see {__file__})")

    def prepare(block: Block) -> list[str]:
        from resnet_fast.models.weights import WEIGHTS_ENUMS

        written = []
        for m in _TORCHVISION_FILE.finditer(block.code):
            arch = m.group("arch")
            if arch not in WEIGHTS_ENUMS:
                pytest.fail(f"{block.label}: {m.group('file')}: {__file__} provides torchvision checkpoints only "
                            f"for the ResNet family {sorted(WEIGHTS_ENUMS)}", pytrace=False)
            torch.save(_random_torchvision_state(arch, 1000), cwd / m.group("file"))
            written.append(m.group("file"))
        for weights in _weights_named(block):
            arch = next(a for a, e in WEIGHTS_ENUMS.items() if e == type(weights).__name__)
            path = checkpoint_path(checkpoints, weights)
            if not path.exists():
                torch.save(_random_torchvision_state(arch, len(weights.meta["categories"])), path)
                written.append(str(path.relative_to(tmp_path)))
        return written

    return prepare


# --------------------------------------------------------------------------- equivalence comments


@dataclasses.dataclass(frozen=True)
class Equivalence:
    line: int  # line of the ``# ==`` comment, within the block (1-based)
    statement: ast.stmt  # the top-level statement it annotates
    target: str  # the name that statement assigns
    expression: str


def _comments(code: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text without '#', whether the line holds only the comment)."""
    import io
    import tokenize

    out = {}
    lines = code.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            out[row] = (tok.string[1:], not lines[row - 1][:col].strip())
    return out


def equivalences(block: Block, tree: ast.Module) -> tuple[list[Equivalence], list[str]]:
    """The block's ``# == expr`` comments that can be checked, and why the others cannot."""
    comments = _comments(block.code)
    found, unchecked = [], []
    for row in sorted(comments):
        text, whole_line = comments[row]
        if not text.lstrip().startswith("=="):
            continue
        parts = [text.lstrip()[2:]]
        nxt = row + 1
        expression = None
        while True:
            try:
                ast.parse(textwrap.dedent(" ".join(p.strip() for p in parts)), mode="eval")
                expression = " ".join(p.strip() for p in parts)
                break
            except SyntaxError:
                if nxt in comments and comments[nxt][1] and not comments[nxt][0].lstrip().startswith("=="):
                    parts.append(comments[nxt][0])
                    nxt += 1
                else:
                    break
        if whole_line:
            before = [s for s in tree.body if s.end_lineno is not None and s.end_lineno < row]
            stmt = before[-1] if before else None
        else:
            stmt = next((s for s in tree.body if s.lineno <= row <= (s.end_lineno or s.lineno)), None)
        targets = getattr(stmt, "targets", None) or ([stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
        if expression is None:
            unchecked.append(f"line {row}: the comment is not a Python expression")
        elif len(targets) != 1 or not isinstance(targets[0], ast.Name):
            unchecked.append(f"line {row}: the statement it follows does not assign one name")
        else:
            found.append(Equivalence(row, stmt, targets[0].id, expression))
    return found, unchecked


def _check_equivalence(block: Block, eq: Equivalence, namespace: dict[str, Any]) -> None:
    import torch.nn.functional as F

    scope = {"torch": torch, "F": F, **namespace}
    where = f"{block.label}, the equivalence comment at README line {block.line + eq.line - 1}"
    problem = None
    try:
        expected = eval(compile(eq.expression, f"<{where}>", "eval"), scope)  # noqa: S307 - README text
    except Exception:  # noqa: BLE001
        problem = f"does not evaluate:\n{traceback.format_exc()}"
    else:
        try:
            # fp32: the fused kernels sum in another order than the stock ops (Winograd, folded BN).
            torch.testing.assert_close(namespace[eq.target], expected, rtol=1e-5, atol=1e-5)
        except AssertionError as error:
            problem = f"does not hold:\n{error}"
    if problem is not None:
        pytest.fail(f"{where}: `{eq.target} == {eq.expression}` {problem}", pytrace=False)


# --------------------------------------------------------------------------- python blocks


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.test_id for b in PYTHON_BLOCKS])
def test_python_block(block: Block, offline_files: Callable[[Block], list[str]]) -> None:
    try:
        tree = ast.parse(block.code, str(README))
    except SyntaxError as error:
        pytest.fail(f"{block.label} is not valid Python: {error.msg} (block line {error.lineno})", pytrace=False)
    ast.increment_lineno(tree, block.line - 1)  # tracebacks point into README.md itself

    key, preamble = _preamble_for(block)
    names = preamble.make() if preamble else {}
    free = free_names(block.code)
    missing, extra = sorted(free - set(names)), sorted(set(names) - free)
    if missing:
        what = (f"its PREAMBLES entry (key {key!r}) does not define {missing}" if preamble else
                f"add a PREAMBLES entry to {__file__}, keyed by a distinctive line of the block, that defines them")
        pytest.fail(f"{block.label} uses names it does not define: {missing}. A README block must be "
                    f"self-contained, or {what}.", pytrace=False)
    if extra:
        pytest.fail(f"{block.label}: its PREAMBLES entry (key {key!r}) defines {extra}, which the block does "
                    f"not use: keep the preamble to the block's free names {sorted(free)}", pytrace=False)

    offline_files(block)
    eqs, _unchecked = equivalences(block, ast.parse(block.code))
    checks = {eq.statement.lineno + block.line - 1: eq for eq in eqs}

    namespace: dict[str, Any] = {"__name__": "__readme__", "__builtins__": builtins, **names}
    for stmt in tree.body:
        code = compile(ast.Module(body=[stmt], type_ignores=[]), str(README), "exec")
        failure: Optional[BaseException] = None
        try:
            exec(code, namespace)  # noqa: S102 - the README's own example
        except Exception as error:  # noqa: BLE001
            failure = error
        if failure is not None:
            hint = ""
            if isinstance(failure, NameError):
                hint = (f"\nA name the block uses is not defined before use: define it in the block, or add it to "
                        f"the block's PREAMBLES entry in {__file__}.")
            frames = traceback.format_exception(type(failure), failure, failure.__traceback__.tb_next)
            pytest.fail(f"{block.label} failed at README line {stmt.lineno}:\n{''.join(frames)}{hint}",
                        pytrace=False)
        if stmt.lineno in checks:
            _check_equivalence(block, checks[stmt.lineno], namespace)


def test_equivalence_comments_are_checked() -> None:
    """Every ``# ==`` comment of a python block is one the test can evaluate, so none is skipped silently."""
    unchecked = []
    for block in PYTHON_BLOCKS:
        for reason in equivalences(block, ast.parse(block.code))[1]:
            unchecked.append(f"{block.label}, {reason}")
    assert not unchecked, "equivalence comments that cannot be checked:\n" + "\n".join(unchecked)


# --------------------------------------------------------------------------- shell blocks

_COMMAND = re.compile(r"(?:(?<![\w/.-])resnet-fast|-m\s+resnet_fast\.cli)\s+(?P<rest>[^&|;#\n]*)")


def shell_commands() -> dict[str, list[tuple[Block, str, list[str]]]]:
    """subcommand -> [(block, README line, --options the line passes)]."""
    found: dict[str, list[tuple[Block, str, list[str]]]] = {}
    for block in SHELL_BLOCKS + TEXT_BLOCKS:
        for offset, line in enumerate(block.code.splitlines()):
            if block.lang == "text" and not line.startswith("$ "):
                continue
            for m in _COMMAND.finditer(line):
                words = m.group("rest").split()
                if not words or words[0].startswith("-"):
                    continue
                options = [w.split("=")[0] for w in words[1:] if w.startswith("--")]
                found.setdefault(words[0], []).append((block, f"README line {block.line + offset}: "
                                                              f"{line.strip()!r}", options))
    return found


SHELL_COMMANDS = shell_commands()


def test_readme_mentions_subcommands() -> None:
    assert SHELL_COMMANDS, "no `resnet-fast <subcommand>` found in any ```bash block of README.md"


def _help(subcommand: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``resnet-fast SUBCOMMAND --help`` in this process: the console script's own function, resnet_fast.cli:main.

    (A subprocess per subcommand would cost a torch import, seconds each on 2 cores; the entry point
    itself is checked by test_console_script_is_registered.)
    """
    from resnet_fast import cli

    capsys.readouterr()
    try:
        code = cli.main([subcommand, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return (0 if code is None else code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize("subcommand", sorted(SHELL_COMMANDS))
def test_shell_subcommand_exists(subcommand: str, capsys: pytest.CaptureFixture[str]) -> None:
    uses = SHELL_COMMANDS[subcommand]
    where = "; ".join(f"{block.label.split(' (line')[0]}, {line}" for block, line, _ in uses)
    code, out, err = _help(subcommand, capsys)
    if code != 0:
        pytest.fail(f"`resnet-fast {subcommand} --help` exited {code}; the README uses it at {where}\n{err[-2000:]}",
                    pytrace=False)
    options = set(re.findall(r"--[\w-]+", out))
    for block, line, passed in uses:
        unknown = [o for o in passed if o not in options]
        if unknown:
            pytest.fail(f"{block.label.split(' (line')[0]}, {line}: `resnet-fast {subcommand}` has no option "
                        f"{unknown} (per its --help)", pytrace=False)


def test_console_script_is_registered() -> None:
    """The README's ``resnet-fast`` is the console script of resnet_fast.cli:main (what the tests above ran)."""
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("resnet-fast") == "resnet_fast.cli:main", (
        f"console script resnet-fast is {scripts.get('resnet-fast')!r}, not resnet_fast.cli:main: reinstall "
        "the package (pip install --no-build-isolation -e .)")
