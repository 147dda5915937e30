"""The package's layers only point down and its modules import no circle (issue 13).

Every import of a project module counts, module-level or inside a function (a lazy import is still a
dependency), read from the source with `ast`: data (and storage) -> families (models, families.py) -> signals ->
attacks -> metrics -> defenses -> settings, the training plan (plans.py) and the scoring of an audited version
(scoring.py) -> the Dagster layer, the orchestration of its backfills and the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "m4i_assets"
LAYERS = (
    ("data", "storage"),
    ("models", "families"),
    ("signals",),
    ("attacks",),
    ("metrics",),
    ("defenses",),
    ("settings", "plans", "scoring"),
    ("defs", "cli", "orchestration"),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pkg import submodule` names the submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in RANK:
        raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")
    return RANK[parts[1]]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items() if name != "m4i_assets"}


def test_every_module_is_in_a_layer():
    for name in graph():
        layer(name)


def test_layers_only_point_down():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph().items() for d in sorted(deps) if layer(d) > layer(m)]  # fmt: skip
    assert not upward, "imports reaching up a layer:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_checks_can_fail():
    """The cycle finder sees a circle, and the layer rule sees an upward import, on made-up graphs."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("m4i_assets.models.clip") < layer("m4i_assets.signals.augmentations")
    with pytest.raises(AssertionError, match="no layer"):
        layer("m4i_assets.reports.x")


def family_branches(path: Path, names: set[str]) -> list[str]:
    """Where a module compares with a family's name (`family == "clip"`) or keys a dict by family names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            strings = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            found += [f"{path.name}:{node.lineno} compares with {s!r}" for s in strings if s in names]
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys & names) > 1:
                found.append(f"{path.name}:{node.lineno} keys a dict by family names")
    return found


KNOWN_BRANCHES = {
    "m4i_assets.models.hf_clip": "compares Hugging Face's `model_type`, not a family",
    "m4i_assets.data.audits": "the audit registry's per-family needs: data sits below the family registry",
}


def test_only_the_family_registry_branches_on_a_family_name():
    """A new family is a new entry of `families.FAMILIES`: no other module branches on a family's name (issue 13),
    but for `KNOWN_BRANCHES`."""
    from m4i_assets.families import FAMILIES

    names = set(FAMILIES)
    found = [b for name, path in modules().items() if name not in ("m4i_assets.families", *KNOWN_BRANCHES)
             for b in family_branches(path, names)]  # fmt: skip
    assert not found, "family-name branches outside families.py:\n" + "\n".join(found)


def test_the_dagster_layer_stays_thin():
    """`defs/` only loads, calls and writes: at most 20% of the package's lines (issue 13)."""
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    share = sum(n for name, n in lines.items() if name.startswith("m4i_assets.defs")) / sum(lines.values())
    assert share <= 0.20, f"defs/ holds {share:.1%} of the package's lines"


def test_the_family_branch_finder_sees_a_branch(tmp_path):
    source = tmp_path / "x.py"
    source.write_text('if family == "clip":\n    pass\nUTILITY = {"clip": 1, "captioner": 2}\n')
    assert len(family_branches(source, {"clip", "captioner"})) == 2
