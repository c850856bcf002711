"""No import circle anywhere in the tree: fadrm, ray_jobs, benchmarks and the test helpers.

`lint-imports` holds the library's layers (pyproject.toml); this holds the rest of the tree
to the simpler rule that no module reaches itself through imports, lazy imports inside
functions included (grimp reads them all). A circle means two modules share something that
belongs in a third module both import.
"""

from __future__ import annotations

import grimp

PACKAGES = ("fadrm", "ray_jobs", "benchmarks", "tests")


def import_circles(*packages: str) -> list[list[str]]:
    """Each set of modules that import each other in a circle, as one example circle
    (``a -> b -> ... -> a``), found with Tarjan's strongly connected components."""
    graph = grimp.build_graph(*packages, cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    circles = []
    for component in components:
        first = component[0]
        second = min(m for m in graph.find_modules_directly_imported_by(first)
                     if m in component)
        back = graph.find_shortest_chain(importer=second, imported=first)
        circles.append([first, *back])
    return circles


def test_the_tree_has_no_import_circle():
    circles = import_circles(*PACKAGES)
    assert not circles, "import circles (move what they share into a module both import):\n" + \
        "\n".join(" -> ".join(c) for c in circles)


def test_an_import_circle_is_found(tmp_path, monkeypatch):
    package = tmp_path / "circ"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from circ import b  # lazy: still a circle\n")
    (package / "b.py").write_text("from circ.c import g\n")
    (package / "c.py").write_text("import circ.a\n\ndef g():\n    pass\n")
    (package / "d.py").write_text("import circ.a\n")  # imports into the circle, not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_circles("circ") == [["circ.a", "circ.b", "circ.c", "circ.a"]]
