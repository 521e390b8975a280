"""Rules of the code base checked by reading its source: test files share code only through
the helpers module and conftest, and the CLI is a thin layer over the public API."""

import ast
from pathlib import Path

import elvis_cli

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
# what test files may import from tests/: shared functions, constants and fixtures, the plain
# reference of the spec, and the entry point of killed subprocesses; never another test file
SHARED = {"tests.helpers", "tests.conftest", "tests.reference_elvis", "tests.reference_ames",
          "tests.kill_runner"}


def imported_modules(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of each import in `path`, a module of `package`;
    `from X import a, b` gives X with [a, b], `import X` gives X with []."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def forbidden_test_imports(path: Path) -> list[str]:
    """Where `path` imports a module of tests/ other than the shared ones."""
    wrong = []
    for line, module, names in imported_modules(path, "tests"):
        # `from tests import test_x` imports a module by name
        targets = [f"{module}.{name}" for name in names] if module == "tests" else [module]
        wrong.extend(f"{path.name}:{line} imports {target}" for target in targets
                     if target.startswith("tests.") and target not in SHARED)
    return wrong


def test_no_test_file_imports_another():
    files = [*sorted(TESTS.glob("test_*.py")), *(TESTS / f"{name}.py" for name in
                                                  ("helpers", "conftest"))]
    assert len(files) > 10
    wrong = [entry for path in files for entry in forbidden_test_imports(path)]
    assert not wrong, "shared test code belongs in tests/helpers.py or conftest.py:\n" + \
        "\n".join(wrong)


def test_the_import_rule_sees_every_form_of_import(tmp_path):
    """The rule above must catch each way of writing the import it forbids."""
    forms = ["from tests.test_cli import elvis", "import tests.test_cli",
             "from tests import test_cli", "from .test_cli import elvis", "from . import test_cli"]
    for form in forms:
        (tmp_path / "test_probe.py").write_text(f"{form}\n")
        assert forbidden_test_imports(tmp_path / "test_probe.py"), form
    allowed = ["from tests.helpers import elvis", "from tests.conftest import SMALL",
               "import tests.kill_runner", "from tests import reference_elvis, helpers"]
    (tmp_path / "test_probe.py").write_text("\n".join(allowed) + "\n")
    assert not forbidden_test_imports(tmp_path / "test_probe.py")


def cli_imports_beyond_the_public_api(path: Path) -> list[str]:
    """Where a module of elvis_cli/cli/ imports from elvis_cli anything but a public name."""
    public = set(elvis_cli.__all__)
    wrong = []
    for line, module, names in imported_modules(path, "elvis_cli.cli"):
        if module == "elvis_cli.cli" or module.startswith("elvis_cli.cli."):
            continue  # the CLI's own modules
        if module == "elvis_cli" and names and set(names) <= public:
            continue
        if module == "elvis_cli" or module.startswith("elvis_cli."):
            wrong.append(f"{path.name}:{line} imports "
                         f"{module}{' (' + ', '.join(names) + ')' if names else ''}")
    return wrong


def test_the_cli_uses_only_the_public_api():
    files = sorted((REPO / "elvis_cli" / "cli").glob("*.py"))
    assert files
    wrong = [entry for path in files for entry in cli_imports_beyond_the_public_api(path)]
    assert not wrong, "the CLI imports beyond elvis_cli.__all__:\n" + "\n".join(wrong)


def test_the_cli_rule_tells_public_from_private_imports(tmp_path):
    cli = tmp_path / "elvis_cli" / "cli"
    cli.mkdir(parents=True)
    probe = cli / "probe.py"
    public = sorted(set(elvis_cli.__all__) - {"__version__"})[0]
    allowed = [f"from elvis_cli import __version__, {public}", "from elvis_cli.cli import app",
               "from .app import main", f"from .. import {public}"]
    forbidden = ["from elvis_cli.retrieval.rerank import rerank", "import elvis_cli.util.errors",
                 "from elvis_cli import not_a_public_name", "from ..util import errors",
                 "import elvis_cli"]
    for form in allowed:
        probe.write_text(f"def f():\n    {form}\n")  # imports inside functions count too
        assert not cli_imports_beyond_the_public_api(probe), form
    for form in forbidden:
        probe.write_text(f"def f():\n    {form}\n")
        assert cli_imports_beyond_the_public_api(probe), form
