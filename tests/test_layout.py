"""The layout rule: the library never imports the lab, and inside the lab analysis depends on the
training harness, never the other way round (README, "The code")."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kalmannorm

PACKAGE = Path(kalmannorm.__file__).parent
LAB = PACKAGE / "lab"


def _imports(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, at top level or inside a function, as absolute names
    (``package``: the package the source sits in, for relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _imported_modules(path: Path) -> set[str]:
    """:func:`_imports` of a file of the package."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports(path.read_text(), package.removesuffix(".__init__"))


def _library_files() -> list[Path]:
    """The library's modules: everything under src/kalmannorm but lab/ and __main__.py (the
    ``python -m kalmannorm`` entry point, which starts the lab's CLI)."""
    files = [
        path
        for path in PACKAGE.rglob("*.py")
        if LAB not in path.parents and path != PACKAGE / "__main__.py"
    ]
    assert PACKAGE / "__init__.py" in files and PACKAGE / "chain.py" in files
    return sorted(files)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_module_imports_the_lab(path: Path) -> None:
    lab = sorted(m for m in _imported_modules(path) if _in(m, "kalmannorm.lab"))
    assert not lab, f"{path.relative_to(PACKAGE)} imports the lab ({', '.join(lab)})"


def test_importing_kalmannorm_loads_no_lab_module() -> None:
    code = (
        "import sys, kalmannorm, kalmannorm.baselines\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('kalmannorm.lab'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "", f"importing kalmannorm loaded {result.stdout.strip()}"


def test_the_training_harness_does_not_import_analysis_or_reproduce() -> None:
    for path in sorted((LAB / "train").rglob("*.py")):
        upward = sorted(
            m
            for m in _imported_modules(path)
            if _in(m, "kalmannorm.lab.analysis") or _in(m, "kalmannorm.lab.reproduce")
        )
        assert not upward, f"{path.relative_to(PACKAGE)} imports {', '.join(upward)}"


def test_the_scan_sees_lab_imports() -> None:
    """The static scan catches absolute, relative and function-level imports of the lab."""
    source = (
        "import kalmannorm.lab.train\n"
        "def f():\n"
        "    from ..lab import analysis\n"
        "    from kalmannorm import lab\n"
    )
    found = _imports(source, "kalmannorm.layers")
    assert {"kalmannorm.lab.train", "kalmannorm.lab", "kalmannorm.lab.analysis"} <= found
