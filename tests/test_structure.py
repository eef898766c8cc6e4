"""The package's module structure: no import cycles, nothing imported from the package itself.

Every module under src/shmring is parsed with ``ast`` (imports inside
functions count: a lazy import is a cycle waiting for the first call that
makes it), the intra-package import graph is built, and it must be acyclic.
Only ``__init__`` may ``from . import NAME`` a name that is not a submodule
(the public API it re-exports); every other module imports a name from the
module that defines it.
"""
import ast
import pathlib
import pkgutil

import pytest

PACKAGE = "shmring"
SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / PACKAGE


def _modules(root: pathlib.Path, package: str) -> dict:
    """Dotted module name -> path, for every .py file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def _submodules(root: pathlib.Path, package: str, modules: dict) -> set:
    """Every importable submodule name: the .py files and packages, and extension modules (_core)."""
    subs = set(modules)
    for directory in {p.parent for p in modules.values()}:
        prefix = ".".join([package, *directory.relative_to(root).parts])
        subs.update(f"{prefix}.{m.name}" for m in pkgutil.iter_modules([str(directory)]))
    return subs


def import_graph(root: pathlib.Path, package: str = PACKAGE):
    """(edges, problems): module -> the package modules it imports, and the
    ``from . import NAME`` of a non-submodule outside ``__init__``."""
    modules = _modules(root, package)
    subs = _submodules(root, package, modules)
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    edges, problems = {m: set() for m in modules}, []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]     # the package a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = []
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in subs:
                        targets.append(full)        # a submodule: `from . import layout`
                    else:
                        targets.append(base)        # a name defined in `base`
                        if base in packages and not is_pkg:
                            problems.append(f"{mod} does `from {'.' * node.level}{node.module or ''} import "
                                            f"{a.name}`: {a.name} is not a submodule; import it from the "
                                            f"module that defines it")
            else:
                continue
            # an extension module (_core) is not parsed: it has no edges here
            edges[mod].update(t for t in targets if t in modules and t != mod)
    return edges, problems


def find_cycle(edges: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}                  # 1: on the current path, 2: done
    path = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        path.pop()
        state[m] = 2
        return None
    for m in sorted(edges):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph(SRC)
    assert len(edges) >= 15 and f"{PACKAGE}.ring" in edges
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_init_imports_names_from_the_package():
    _, problems = import_graph(SRC)
    assert problems == []


# --- the checker itself fails when it should -----------------------------------------

def _package(tmp_path, files: dict) -> pathlib.Path:
    root = tmp_path / "pkg"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("b_imports", ["from .a import f", "from . import a", "import pkg.a",
                                       "def later():\n    from .a import f\n"])
def test_a_cycle_is_found_even_through_a_lazy_import(tmp_path, b_imports):
    root = _package(tmp_path, {"__init__.py": "", "a.py": "from . import b\ndef f(): pass\n",
                               "b.py": b_imports + "\n", "c.py": "from .a import f\n"})
    edges, problems = import_graph(root, "pkg")
    assert edges["pkg.c"] == {"pkg.a"}
    assert find_cycle(edges) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    assert problems == []


def test_a_cycle_through_the_package_init_is_found(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from .a import f\n", "a.py": "from .b import g\ndef f(): pass\n",
                               "b.py": "import pkg\ndef g(): pass\n"})
    edges, _ = import_graph(root, "pkg")
    assert find_cycle(edges) is not None


def test_importing_a_name_from_the_package_init_is_reported(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from .a import f\nfrom . import b\n",
                               "a.py": "def f(): pass\n", "b.py": "from . import a\n",
                               "c.py": "from . import f, a\n", "d.py": "from pkg import f\n"})
    edges, problems = import_graph(root, "pkg")
    assert find_cycle(edges) is None
    assert len(problems) == 2
    assert problems[0].startswith("pkg.c does `from . import f`") and problems[1].startswith("pkg.d does `from pkg import f`")
