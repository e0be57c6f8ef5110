"""The package's structure: layers in one order, no import cycles, no reads of another
module's private names, a jax-free config, no backend-name branches in generic code, modules
of readable size, one registry, the kernels namespace. Covers ``longctx/`` and ``kernels/``
(installed as ``longctx.kernels``)."""

import ast
import fnmatch
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "longctx")
KERNELS = os.path.join(ROOT, "kernels")
MAX_LINES = 600

# The layers, lowest first: a module imports modules of its own layer or below, never above
# (DESIGN.md: config sections <- functional math <- Flax layers <- model <- trainer <- tools).
# A module's layer is that of the first pattern it matches, in this order (``*`` matches dots
# too); a module that matches none fails test_every_module_has_a_layer (place a new module here).
LAYERS = [
    ("config", ["longctx.errors", "longctx.config", "longctx.rope_config", "longctx.xla_flags",
                "longctx.atomic", "longctx.*.config", "longctx.backends.*.config",
                "longctx.inherit.distill_config", "longctx.parallel.axes",
                # jax-free example generators and tokenisation: the config validates tasks
                "longctx.data.synthetic", "longctx.data.ruler", "longctx.data.ruler_text",
                "longctx.data.prepare",
                # packages whose __init__ imports nothing
                "longctx.backends", "longctx.backends.full", "longctx.backends.linear",
                "longctx.backends.recurrent", "longctx.data", "longctx.inherit", "longctx.moe",
                "longctx.parallel"]),
    # longctx.targets: the platform compiled for and the chips table (jax only), read by every
    # automatic choice from the kernels up
    ("math", ["longctx.targets", "longctx.gpu_targets", "longctx.backends.*.ops", "longctx.backends.*.forms", "longctx.backends.*.blocks",
              "longctx.backends.recurrent.memory", "longctx.moe.ops", "longctx.kernels",
              "longctx.kernels.*", "longctx.ops", "longctx.rope", "longctx.parallel.*",
              "longctx.data.sources", "longctx.data.pipeline"]),
    ("layers", ["longctx.layers", "longctx.backends.base", "longctx.backends.*.mixer",
                "longctx.backends.*.*_mixer", "longctx.backends.recurrent.memory_tokens",
                "longctx.moe.layer"]),
    ("model", ["longctx.model", "longctx.model.*"]),
    ("trainer", ["longctx.train", "longctx.train.*"]),
    ("tools", ["longctx.evals", "longctx.evals.*", "longctx.hf", "longctx.hf.*",
               "longctx.inherit.*", "longctx.generate", "longctx.convert", "longctx.compile"]),
    ("api", ["longctx"]),  # the root package re-exports the public API
]

# Reads of another module's private names that are known and owned elsewhere. Each entry is
# (module, the private name it reads); remove an entry when its fix lands: the test then
# fails if the read is still there, so the list can only shrink. Empty: none is left.
PRIVATE_READS_TO_FIX: set[tuple[str, str]] = set()


def _modules() -> dict[str, str]:
    """Module name -> path for every .py file of the package and of ``kernels/``."""
    out = {}
    for top, name in ((PKG, "longctx"), (KERNELS, "longctx.kernels")):
        for dirpath, _, files in os.walk(top):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                    out[f"{name}.{rel}".removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int | None:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


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


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"


def _layer_violations(graph, modules) -> list[str]:
    out = []
    for m, deps in sorted(graph.items()):
        lm = _layer(m)
        for d in sorted(deps):
            if d in modules and _layer(d) is not None and lm is not None and _layer(d) > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {d} ({LAYERS[_layer(d)][0]})")
            elif d.split(".")[0] in ("experiments", "launch", "tests"):
                out.append(f"{m} imports {d}: the package never imports experiments/launch/tests")
    return out


def test_layers_point_one_way():
    """config <- math <- layers <- model <- trainer <- tools <- the root's re-exports."""
    graph, modules = _graph()
    bad = _layer_violations(graph, modules)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_layer_check_finds_an_upward_import():
    graph = {"longctx.backends.full.ops": {"longctx.model.transformer"},
             "longctx.model.transformer": set(), "longctx.train.loss": {"experiments.scaling"}}
    bad = _layer_violations(graph, set(graph))
    assert bad == ["longctx.backends.full.ops (math) imports longctx.model.transformer (model)",
                   "longctx.train.loss imports experiments.scaling: the package never imports "
                   "experiments/launch/tests"]


def _private_reads(name: str, source: str, modules) -> set[tuple[str, str]]:
    """``(name, "other.module._private")`` for every private name of another internal module
    this one imports (``from m import _x``) or reads as an attribute (``import m as a; a._x``)."""
    tree = ast.parse(source)
    aliases, out = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    aliases[a.asname or a.name] = sub
                elif node.module in modules and node.module != name and a.name.startswith("_"):
                    out.add((name, f"{node.module}.{a.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__") and aliases[node.value.id] != name):
            out.add((name, f"{aliases[node.value.id]}.{node.attr}"))
    return out


def test_no_module_reads_another_modules_private_names():
    modules = _modules()
    found = set()
    for name, path in modules.items():
        found |= _private_reads(name, open(path).read(), modules)
    assert not found - PRIVATE_READS_TO_FIX, sorted(found - PRIVATE_READS_TO_FIX)
    assert not PRIVATE_READS_TO_FIX - found, ("fixed: remove from PRIVATE_READS_TO_FIX",
                                              sorted(PRIVATE_READS_TO_FIX - found))


def test_the_private_read_check_sees_both_forms():
    mods = {"longctx.a", "longctx.b"}
    src = "from longctx.b import _x, y\nfrom longctx import b as bb\nz = bb._ACTIVE, bb.__name__\n"
    assert _private_reads("longctx.a", src, mods) == {("longctx.a", "longctx.b._x"),
                                                      ("longctx.a", "longctx.b._ACTIVE")}


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
