"""Structure of the package, read from its source: short files, no reach-ins between modules."""

import ast
import pathlib

import skid

ROOT = pathlib.Path(skid.__file__).parent
MAX_LINES = 650


def _modules() -> dict:
    """Dotted module name → path, for every module of the package."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_from(name: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The dotted module an ``ImportFrom`` in module ``name`` reads from."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _reach_ins(name: str, path: pathlib.Path, modules: dict) -> list[str]:
    """Underscore names of other skid modules that module ``name`` reads."""
    found, aliases = [], {}  # local name -> the skid module it is bound to
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _imported_from(name, path, node)
            if source not in modules or source == name:
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target in modules:  # a submodule: private module names are fine
                    aliases[alias.asname or alias.name] = target
                elif _is_private(alias.name):
                    found.append(f"{name}: from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and aliases[node.value.id] != name
                and _is_private(node.attr)):
            found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_reads_another_modules_underscore_names():
    modules = _modules()
    found = [hit for name, path in sorted(modules.items())
             for hit in _reach_ins(name, path, modules)]
    assert found == []


def test_no_file_in_skid_is_longer_than_the_limit():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
               for path in ROOT.rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}


def _is_unit(expr: ast.expr) -> bool:
    last = ast.unparse(expr).split(".")[-1]
    return last == "u" or "unit" in last


def _is_string(expr: ast.expr) -> bool:
    items = expr.elts if isinstance(expr, (ast.Tuple, ast.List, ast.Set)) else [expr]
    return all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items)


def _kind_tests(source: str) -> list[str]:
    """Tests of a unit's ``kind`` against strings (``unit.kind == "heads"``) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" and _is_unit(s.value)
                   for s in sides) and any(_is_string(s) for s in sides):
                found.append(ast.unparse(node))
    return found


def test_unit_kinds_dispatch_through_the_registry():
    """What differs between unit kinds is an entry of skid.nn._unit_kinds, not a string test."""
    found = {str(path.relative_to(ROOT)): hits for path in ROOT.rglob("*.py")
             if (hits := _kind_tests(path.read_text()))}
    assert found == {}


def test_the_checks_see_a_reach_in(tmp_path):
    """The reach-in check is not vacuous: it flags both spellings of a reach-in."""
    path = tmp_path / "m.py"
    path.write_text("from ._a import _hidden, shown\nfrom . import _a\nx = _a._other\n")
    modules = {"skid": path, "skid.m": path, "skid._a": path}
    assert _reach_ins("skid.m", path, modules) == [
        "skid.m: from skid._a import _hidden", "skid.m: skid._a._other"]


def test_the_checks_see_a_kind_test():
    source = ('a = unit.kind == "heads"\nb = [u for u in us if u.kind != "x"]\n'
              'c = node.kind == "conv"\nd = s.unit.kind in ("heads",)\n')
    assert sorted(_kind_tests(source)) == [
        "s.unit.kind in ('heads',)", "u.kind != 'x'", "unit.kind == 'heads'"]
