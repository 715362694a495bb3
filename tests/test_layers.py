"""The layer order of docs/architecture.md: a module never imports one of a higher layer, not even inside a
function. Read from the source (every `import` statement, at any depth), so a wrong-way import fails here with
its file, line and both layers named."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fermion"

# Bottom to top. A module belongs to the layer whose prefix matches its dotted name.
LAYERS = [
    ("fermion", "fermion.config", "fermion.errors", "fermion.atomic", "fermion.layout", "fermion.device"),
    ("fermion.data", "fermion.chat"),
    ("fermion.model",),
    ("fermion.checkpoint",),
    ("fermion.infer", "fermion.export"),
    ("fermion.eval",),
    ("fermion.prepare",),
    ("fermion.train",),
    ("fermion.run", "fermion.card", "fermion.demo", "fermion.serve", "fermion.cli", "fermion.__main__"),
]


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS, start=1):  # "fermion" itself: the package's __init__ only
        if any(module == prefix or (prefix != "fermion" and module.startswith(prefix + ".")) for prefix in prefixes):
            return index
    return None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(root: Path, name: str) -> bool:
    path = root.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def imported_modules(path: Path, module: str, root: Path):
    """(line, dotted name) of every fermion module `path` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from fermion.x import y` may name a submodule y: count it as fermion.x.y where that is a module.
            names = [f"{base}.{alias.name}" if is_module(root, f"{base}.{alias.name}") else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == "fermion" or name.startswith("fermion."):
                yield node.lineno, name


def wrong_way_imports(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        if own is None:
            found.append(f"{path.relative_to(root.parent)}: module {module} is in no layer (add it to LAYERS)")
            continue
        for line, name in imported_modules(path, module, root):
            other = layer_of(name)
            if other is not None and other > own:
                found.append(f"{path.relative_to(root.parent)}:{line}: {module} (layer {own}) imports {name} "
                             f"(layer {other})")
    return found


def test_no_module_imports_a_higher_layer():
    found = wrong_way_imports()
    assert not found, "wrong-way imports:\n" + "\n".join(found)


def test_the_check_names_a_wrong_way_import(tmp_path):
    fake = tmp_path / "fermion"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("def f():\n    from fermion.train import trainer\n")
    (fake / "train").mkdir()
    (fake / "train" / "trainer.py").write_text("")
    (fake / "mystery.py").write_text("")
    found = wrong_way_imports(fake)
    assert found == ["fermion/model/bad.py:2: fermion.model.bad (layer 3) imports fermion.train.trainer (layer 8)",
                     "fermion/mystery.py: module fermion.mystery is in no layer (add it to LAYERS)"]


@pytest.mark.parametrize("module", ["fermion.model.transformer", "fermion.config", "fermion.checkpoint"])
def test_layer_of_known_modules(module):
    assert layer_of(module) is not None



def fresh_modules(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running `code` (this one's sys.modules already has them all)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_nothing_compiles_at_import_time():
    assert "torch._dynamo" not in fresh_modules("import fermion.model.transformer")


def test_the_benchmark_catalogue_imports_no_model_code():
    """eval/'s tasks reach a model only through the EvalModel they are handed (fermion.infer.lm)."""
    loaded = fresh_modules("import importlib, pkgutil, fermion.eval\n"
                           "for info in pkgutil.iter_modules(fermion.eval.__path__):\n"
                           "    importlib.import_module('fermion.eval.' + info.name)")
    heavy = [m for m in loaded if m.startswith(("fermion.model", "fermion.checkpoint", "fermion.infer.engine",
                                                 "fermion.infer.lm", "fermion.train"))]
    assert "fermion.eval.runner" in loaded and not heavy, f"eval/ imports model code: {heavy}"


def test_a_recipes_mistake_is_reported_before_pytorch_is_imported(tmp_path):
    """Every command that reads a recipe reads it first: a typo's one-line error costs no PyTorch import (seconds of
    CPU, a minute on a loaded machine)."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model: {d_modl: 12}\n")
    commands = [["pretrain"], ["prepare"], ["sft"], ["dpo"], ["tokenizer", "train"], ["model", "info"], ["run"]]
    code = ("import contextlib, io, sys\nfrom fermion.cli import app\nheavy = []\n"
            f"for command in {commands!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"        with contextlib.suppress(SystemExit): app([*command, {str(recipe)!r}])\n"
            "    heavy += [' '.join(command)] * ('torch' in sys.modules)\n"
            "print('heavy:', heavy)")
    loaded = fresh_modules(code)
    assert "torch" not in loaded, "a command imported PyTorch before reporting the recipe's error"
