"""The architecture's rules, checked: the import contracts and no repeated code.

The rules live in pyproject.toml: [tool.importlinter] (the layers storage <- cloud_backbone <-
clients <- platform, what the device may import from the cloud half, where protobuf may be
imported) and [tool.pylint.similarities] (pylint's duplicate-code settings).
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from pylint.checkers.symilar import Symilar

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("storage", "cloud_backbone", "clients", "platform")
GENERATED = re.compile(r".*_pb2(_grpc)?\.py$")


def lint_imports(root: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """import-linter's `lint-imports` on the contracts of `root`'s pyproject.toml."""
    env = dict(os.environ, COLUMNS="400")  # one import per line, unwrapped, to search the report
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    return subprocess.run(
        [*command, "--no-cache", "--no-logo", "pyproject.toml"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def contract_names() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [c["name"] for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]]


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contract_names():
        assert f"{name} KEPT" in result.stdout


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    """A copy of the product code as the package `plora`, first on PYTHONPATH (ahead of the
    editable install), with one forbidden import planted for each contract.

    The imports are planted in regular packages only: the namespace package plora.platform
    would also take in the editable install's portion, and grimp may read either copy."""
    for folder in PRODUCT:
        shutil.copytree(ROOT / folder, tmp_path / "plora" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    layers, top, device, protobuf = contract_names()
    planted = {
        layers: ("cloud_backbone/loading.py", "plora.clients.data"),
        top: ("storage/paths.py", "plora.platform.jobs"),
        device: ("clients/data.py", "plora.cloud_backbone.loading"),
        protobuf: ("clients/anchor.py", "plora.cloud_backbone.protocol.split_pb2"),
    }
    for path, imported in planted.values():
        with open(tmp_path / "plora" / path, "a") as f:
            f.write(f"\nimport {imported}\n")

    result = lint_imports(tmp_path, pythonpath=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    # The report of broken contracts: each contract's name, underlined, then its violations.
    report = result.stdout.split("Broken contracts\n", 1)[-1]
    sections = dict(re.findall(r"\n([^\n]+)\n-+\n(.*?)(?=\n[^\n]+\n-+\n|\Z)", report, re.DOTALL))
    for name, (path, imported) in planted.items():
        importer = "plora." + path.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> {imported}" in sections.get(name, ""), f"{name!r} did not report {importer} -> {imported}:\n{result.stdout}"


def duplicate_code_report(files: list[Path]) -> tuple[int, str]:
    """pylint's duplicate-code check over `files` with the settings in pyproject.toml: the
    number of duplicated lines and pylint's report.

    This runs the check's engine (pylint.checkers.symilar) itself. Imports and signatures are
    blanked out here, found with `ast`, instead of by pylint, which finds them in astroid's
    trees: building those infers through torch, some 15 s of CPU for the same report."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        settings = tomllib.load(f)["tool"]["pylint"]["similarities"]
    similar = Symilar(
        min_lines=settings["min-similarity-lines"],
        ignore_comments=settings["ignore-comments"],
        ignore_docstrings=settings["ignore-docstrings"],
    )
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for number in ignored_lines(ast.parse("".join(lines)), settings["ignore-imports"], settings["ignore-signatures"]):
            lines[number - 1] = "\n"  # blank lines are not compared
        similar.append_stream(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), io.StringIO("".join(lines)))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        similar.run()
    report = out.getvalue()
    return int(re.search(r"duplicates=(\d+)", report).group(1)), report


def ignored_lines(tree: ast.Module, imports: bool, signatures: bool) -> set[int]:
    """The line numbers of the imports and the function signatures in `tree`, as pylint's
    ignore-imports and ignore-signatures take them out."""
    ignored: set[int] = set()
    for node in ast.walk(tree):
        if imports and isinstance(node, ast.Import | ast.ImportFrom):
            ignored.update(range(node.lineno, node.end_lineno + 1))
        elif signatures and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            ignored.update(range(node.lineno, node.body[0].lineno))
    return ignored


def product_files() -> list[Path]:
    return sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py") if not GENERATED.match(p.name))


def test_no_block_of_code_is_repeated():
    duplicated, report = duplicate_code_report(product_files())
    assert duplicated == 0, report


def test_the_duplicate_check_finds_a_block_repeated_with_other_comments_and_imports(tmp_path):
    block = "\n".join(f"    total = total * {i} + len(items[{i}])" for i in range(6))
    (tmp_path / "first.py").write_text(f"import os\n\n\ndef first(items):\n    total = 0\n{block}\n    return total\n")
    (tmp_path / "second.py").write_text(
        f'import sys\n\n\ndef second(items):\n    """Another docstring."""\n    # another comment\n    total = 0\n{block}\n    return -total\n'
    )
    duplicated, report = duplicate_code_report([tmp_path / "first.py", tmp_path / "second.py"])
    assert duplicated >= 6, report


def test_the_duplicate_check_leaves_five_repeated_lines_alone(tmp_path):
    block = "\n".join(f"total = total * {i} + {i}" for i in range(4))
    (tmp_path / "first.py").write_text(f"total = 0\n{block}\nprint(1)\n")
    (tmp_path / "second.py").write_text(f"total = 0\n{block}\nprint(2)\n")
    duplicated, report = duplicate_code_report([tmp_path / "first.py", tmp_path / "second.py"])
    assert duplicated == 0, report


def test_the_wheel_ships_every_folder_of_code():
    """A folder missing from pyproject's `packages` is left out of `pip install .` (the
    container image), though the editable install of the tests finds it."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for code in (ROOT / folder).rglob("*.py"):
            found.add(".".join([package, *code.parent.relative_to(ROOT / folder).parts]))
    assert found == set(setuptools["packages"])


def test_every_module_of_the_product_imports_and_has_every_name_imported_from_it():
    """Commands import their modules when they run (the CLI starts without torch), and many a
    function imports what it needs when called, so a module that no longer imports, or a name
    renamed under an import in a function, fails only when someone runs that code: `plora bench
    federated` once imported a name another module had renamed, and no test ran it."""
    modules, imported = [], []  # imported: (where, module, name) of every `from plora... import`, wherever it sits
    for folder in PRODUCT:
        for code in (ROOT / folder).rglob("*.py"):
            if "migrations" in code.parts:  # alembic's scripts, which only alembic runs
                continue
            modules.append(".".join(["plora", *code.relative_to(ROOT).with_suffix("").parts]).removesuffix(".__init__"))
            for node in ast.walk(ast.parse(code.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("plora."):
                    where = f"{code.relative_to(ROOT)}:{node.lineno}"
                    imported.extend((where, node.module, alias.name) for alias in node.names)
    check = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "missing = []\n"
        f"for where, module, name in {imported!r}:\n"
        "    try:\n"
        "        if not hasattr(importlib.import_module(module), name):\n"
        "            importlib.import_module(module + '.' + name)  # a submodule, or ImportError\n"
        "    except ImportError:\n"
        "        missing.append(f'{where}: {module} has no {name}')\n"
        "sys.exit('\\n'.join(missing) or None)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT.parent, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
