"""The package's structure: no import cycles, a jax-free config, no backend-name branches in
generic code, modules of readable size, one registry, the kernels namespace."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "longctx")
MAX_LINES = 600


def _modules() -> dict[str, str]:
    """Module name -> path for every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: str, modules) -> set[str]:
    """Every module of the package (or outside it) imported *anywhere* in the file:
    module level and function level alike (a function-level import dodging a cycle
    is a cycle). ``from a import b`` counts as ``a.b`` when that is a module. An
    import of ``a.b.c`` also imports the packages ``a.b`` and ``a`` (their
    ``__init__``), except the importer's own ancestors (already being imported when it
    runs) and the root ``longctx``, whose ``__init__`` only re-exports."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = name.split(".")[:len(name.split(".")) - node.level + int(is_pkg)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    out = set()
    for mod in found:
        parts = mod.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        out.add(parts[0])
    parts = name.split(".")
    return out - {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}, modules


def test_no_import_cycles():
    graph, modules = _graph()
    internal = {m: {d for d in deps if d in modules} for m, deps in graph.items()}
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(internal, WHITE)
    stack: list[str] = []

    def visit(m):
        color[m] = GREY
        stack.append(m)
        for d in sorted(internal[m]):
            if color[d] == GREY:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if color[d] == WHITE:
                visit(d)
        stack.pop()
        color[m] = BLACK

    for m in sorted(internal):
        if color[m] == WHITE:
            visit(m)


def test_the_cycle_detector_finds_a_cycle(tmp_path, monkeypatch):
    """The graph builder sees function-level imports and package __init__ edges."""
    src = tmp_path / "longctx"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("from longctx.sub import b\n")
    (src / "sub" / "b.py").write_text("def f():\n    from longctx import c\n")
    (src / "c.py").write_text("from longctx.sub.b import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", str(src))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_config_imports_no_jax():
    graph, modules = _graph()
    seen, todo = set(), ["longctx.config"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(d for d in graph.get(m, ()) if d in modules)
    heavy = {d.split(".")[0] for m in seen for d in graph[m]} & {"jax", "flax", "optax",
                                                                 "orbax", "grain"}
    assert not heavy, f"longctx.config imports {heavy} through {sorted(seen)}"


def test_no_module_over_600_lines():
    long = {n: sum(1 for _ in open(p)) for n, p in _modules().items()}
    assert not {n: c for n, c in long.items() if c > MAX_LINES}


def _backend_branches(source: str, backends) -> list[str]:
    """Comparisons of something backend-like with a backend name, and reads of the raw
    ``.backend`` key: ``cfg.attention.backend == "full"``, ``"linear" in backends``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            consts = [n.value for n in [node.left, *node.comparators]
                      if isinstance(n, ast.Constant)]
            if any(c in backends for c in consts) and "backend" in ast.unparse(node):
                out.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr == "backend":
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_generic_code_never_branches_on_a_backend_name():
    """The model driver, segment engine, trainer, metrics and evals ask the mixers instead
    (registry.py is the one place that maps names to classes)."""
    from longctx.config import BACKENDS

    bad = '"""x"""\nif cfg.attention.backend == "recurrent":\n    pass\n'
    assert _backend_branches(bad, BACKENDS)  # the detector sees the pattern it forbids
    offenders = []
    for name, path in _modules().items():
        generic = name.startswith(("longctx.model", "longctx.train", "longctx.evals"))
        if generic and name != "longctx.model.registry":
            offenders += [f"{name}:{hit}" for hit in _backend_branches(open(path).read(),
                                                                        BACKENDS)]
    assert not offenders, offenders


def test_registry_and_config_sections_name_the_same_backends():
    from longctx.config import SECTIONS
    from longctx.model.registry import BACKENDS

    assert set(BACKENDS) == set(SECTIONS)


def test_public_namespaces():
    import longctx
    from longctx import ops
    from longctx.backends.full import ops as full_ops
    from longctx.backends.linear import ops as linear_ops

    assert longctx.ops is ops
    assert ops.attention is full_ops.attention
    assert ops.linear_attention is linear_ops.linear_attention
    assert ops.delta_rule is linear_ops.delta_rule
    with pytest.raises(ImportError):  # the 0.1.0 aliases of the kernels' old home are gone
        import longctx.attention  # noqa: F401


def test_kernels_install_inside_the_namespace():
    import longctx.kernels

    assert os.path.samefile(os.path.dirname(longctx.kernels.__file__),
                            os.path.join(ROOT, "kernels"))


def test_pyproject_lists_every_package():
    import tomllib

    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
                 ["tool"]["setuptools"]["packages"])
    found = {n for n, p in _modules().items() if p.endswith("__init__.py")}
    assert found | {"longctx.kernels", "experiments", "experiments.configs"} == listed
