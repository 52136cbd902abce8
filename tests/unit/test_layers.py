"""Imports run down the layers: the rule, read from the source with `ast`.

    base      model, controls, hist, rates, sizes, hostpaths, fdinfo, asm: import only each other
    sources   collectors: never the engine, the UI, stats, doctor or a command-line module
    stats     the aggregator: only base and sources.readings
    ui        the dashboard: only base (the model) and its own feeds, never a collector
    engine    the reference engine, and qemu: never ui, stats or a command-line module
    export    the Prometheus exporter, a view like the ui: only base (the model)

pctop.root, the composition root, and pctop.cli above it may import anything: they
alone pick and start the parts. KNOWN lists the imports that still break the rule,
each to go; an entry that no longer exists fails the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "pctop"
BASE = {"pctop", "pctop.model", "pctop.controls", "pctop.hist", "pctop.rates", "pctop.sizes", "pctop.hostpaths",
        "pctop.fdinfo", "pctop.asm"}
CLI = ("pctop.cli",)


def layer(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod.startswith(CLI):
        return "cli"
    for name in ("sources", "engine", "qemu", "ui", "sinks", "export"):
        if mod.startswith(f"pctop.{name}.") or mod == f"pctop.{name}":
            return name
    return mod.removeprefix("pctop.")  # stats, doctor, probe_build, ...


FORBIDDEN = {
    "base": lambda to: layer(to) != "base",
    "sources": lambda to: layer(to) in ("engine", "ui", "stats", "doctor", "cli"),
    "stats": lambda to: layer(to) != "base" and to != "pctop.sources.readings",
    "ui": lambda to: layer(to) in ("engine", "qemu", "stats", "cli", "sources", "doctor"),
    "engine": lambda to: layer(to) in ("ui", "stats", "cli"),
    "qemu": lambda to: layer(to) in ("ui", "stats", "cli"),
    "export": lambda to: layer(to) not in ("base", "export"),
}

KNOWN: set[tuple[str, str]] = set()  # none left


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            for a in node.names:  # `from pctop import doctor`: the module pctop.doctor
                sub = PKG.parent.joinpath(*f"{base}.{a.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.add(f"{base}.{a.name}")
    return {m for m in out if m == "pctop" or m.startswith("pctop.")}


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in PKG.rglob("*.py"):
        mod = module_name(path)
        rule = FORBIDDEN.get(layer(mod))
        if rule is None:
            continue
        for to in imports_of(path):
            if to != mod and rule(to) and not (to == "pctop" and layer(mod) == "base"):
                found.add((mod, to))
    return found


def test_imports_run_down_the_layers():
    found = violations()
    new = sorted(found - KNOWN)
    assert not new, "imports against the layers (see this file's docstring): " + ", ".join(f"{a} -> {b}" for a, b in new)


def test_the_list_of_known_exceptions_only_shrinks():
    gone = sorted(KNOWN - violations())
    assert not gone, f"no longer imported, remove from KNOWN: {gone}"


def test_the_rule_catches_an_import_against_it(tmp_path, monkeypatch):
    """The checker itself: a collector that imports the engine is caught."""
    pkg = tmp_path / "pctop"
    (pkg / "sources").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sources" / "__init__.py").write_text("")
    (pkg / "sources" / "bad.py").write_text("from pctop.engine import uffd\nfrom ..ui import app\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PKG"]), "PKG", pkg)
    assert violations() == {("pctop.sources.bad", "pctop.engine"), ("pctop.sources.bad", "pctop.ui")}
