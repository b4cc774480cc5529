"""The package's layers (README "Architecture"): every import points down or sideways within a
layer, never up; no import cycle between modules or between parts; the library never imports
``configs``. Checked on the source (module-level and function-local imports alike)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module belongs to the layer of its longest listed prefix
LAYERS = {
    "base": ("errors", "files", "data", "parallel", "config_file", "dtypes"),
    "networks": ("models", "sd"),
    "maths": ("shortcut", "protect", "personalize", "purify", "metrics"),
    "io": ("checkpoint", "loop", "sources", "miniworld"),
    "jobs": ("jobs",),
    "evaluation": ("evaluate",),
    "commands": ("cli",),
}
RANK = {f"ldu_jax.{p}": i for i, (_, prefixes) in enumerate(LAYERS.items()) for p in prefixes}
NAMES = list(LAYERS)


def modules():
    out = {}
    for d, _, names in os.walk(os.path.join(ROOT, "ldu_jax")):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(d, n)
                m = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[m[:-9] if m.endswith(".__init__") else m] = path
    return out


def imports(mods):
    """{module: {imported ldu_jax / configs module}}."""
    def resolve(name):
        while name and name not in mods and not name.startswith("configs"):
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for m, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".")[: len(m.split(".")) - node.level + (1 if path.endswith("__init__.py") else 0)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            found |= {resolve(n) for n in names if n.split(".")[0] in ("ldu_jax", "configs")}
        edges[m] = found - {None, m, "ldu_jax"}
    return edges


def rank(m):
    hits = [p for p in RANK if m == p or m.startswith(p + ".")]
    assert hits, f"{m} is in no layer of tests/test_layers.py: place it"
    return RANK[max(hits, key=len)]


def cycles(edges):
    """Strongly connected components with more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down():
    edges = imports(modules())
    up = [f"{m} ({NAMES[rank(m)]}) imports {t} ({NAMES[rank(t)]})"
          for m, ts in sorted(edges.items()) for t in sorted(ts)
          if not t.startswith("configs") and rank(t) > rank(m)]
    assert not up, "imports pointing up a layer:\n" + "\n".join(up)


def test_the_library_never_imports_configs():
    edges = imports(modules())
    bad = [f"{m} imports {t}" for m, ts in sorted(edges.items()) for t in sorted(ts) if t.startswith("configs")]
    assert not bad, "\n".join(bad)


def test_no_cycles_between_modules_or_parts():
    edges = imports(modules())
    # a package importing its own submodules (ldu_jax.evaluate -> ldu_jax.evaluate.runner) is no cycle
    mod_edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    assert cycles(mod_edges) == []
    part = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    part_edges = {}
    for m, ts in edges.items():
        part_edges.setdefault(part(m), set()).update(part(t) for t in ts if part(t) != part(m))
    found = cycles(part_edges)
    assert found == [], "part cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_fail_on_a_violation():
    """The checks above can fail: an upward import and a cycle are found in a made-up graph."""
    assert rank("ldu_jax.sd.unet") < rank("ldu_jax.jobs.protect") < rank("ldu_jax.cli.perturb")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    edges = imports(modules())
    assert "ldu_jax.jobs.protect" in edges["ldu_jax.cli.perturb"]           # the parser sees real imports
    assert "ldu_jax.protect.ldu" in edges["ldu_jax.jobs.protect"]
