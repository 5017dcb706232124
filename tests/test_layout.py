"""The package's folders import one way (gorila_jax/__init__.py lists the order): a module
may import from its own folder and from folders before it, never after, so the pure core
stays free of processes and sockets and nothing depends on the entry points. Read from
the source (every `import` / `from ... import` of gorila_jax, also inside functions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gorila_jax"
ORDER = ("core", "envs", "io", "wire", "server", "bundle", "aggregator", "run")


def _imports(path: Path) -> list[str]:
    """The gorila_jax modules `path` imports, as dotted names."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gorila_jax":
                names += [f"gorila_jax.{alias.name}" for alias in node.names]
            elif node.module.startswith("gorila_jax."):
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("gorila_jax.")]
    return names


def _group(dotted: str) -> str:
    return dotted.split(".")[1]


def test_every_module_lives_in_a_known_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside the folders: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert sorted(ORDER) == folders


def test_imports_go_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) < 2:
            continue
        group = relative.parts[0]
        for name in _imports(path):
            target = _group(name)
            if ORDER.index(target) > ORDER.index(group):
                wrong.append(f"{relative} imports {name} ({group} -> {target})")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The checker itself can fail: an import of the launcher from the core is found."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from gorila_jax.run.launch import main\n")
    names = _imports(module)
    assert names == ["gorila_jax.run.launch"]
    assert ORDER.index(_group(names[0])) > ORDER.index("core")


def test_the_bundles_client_imports_no_jax():
    """The client of the sharded server is sockets and numpy: importing it (and the wire
    it speaks) loads no JAX, so what a bundle sends is separate from how it computes."""
    code = (
        "import sys, gorila_jax.bundle.client, gorila_jax.wire.transport;"
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
