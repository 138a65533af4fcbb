"""The package's layers (docs/design.md, "Layers"): every module imports only its own layer and those before it, no
module passes 400 lines, the package finds its presets without editing its `__path__`, and docs/design.md's
module list and layering are the code's."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.checkout import MAPPED

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "extkd_jax"
CONFIGS = REPO_ROOT / "configs"  # shipped as extkd_jax.configs (setup.cfg's package_dir)
DESIGN = REPO_ROOT / "docs" / "design.md"
MAX_LINES = 400

# lowest first; a module may import its own layer and the layers before it. `configs` (the presets and base.py's
# defaults) is config data: below the engine, which reads base.py's defaults, above the method table it names.
# `api`: the entry points (the package root's lazy attributes, api.py, cli.py, __main__.py), which use everything.
LAYERS = ("_extras", "losses", "models", "data", "methods", "configs", "train", "experiment", "api")
API_MODULES = ("extkd_jax", "extkd_jax.api", "extkd_jax.cli", "extkd_jax.__main__")
# the one name a lower layer may import from the package root (importing any submodule runs the root anyway)
ROOT_NAMES = {"__version__"}
# imports against the layers, inside a function, each with its reason
ALLOWED_LAZY = {
    # `extkd_jax.train(config, workdir)`: the engine's package is callable and forwards to the API's train
    ("extkd_jax.train", "extkd_jax.api"): "the callable package forwards to extkd_jax.api.train",
}


def _module_files() -> dict[str, pathlib.Path]:
    """Every module of the package, by dotted name; configs/ as extkd_jax.configs."""
    files = {}
    for root, prefix in ((PACKAGE, "extkd_jax"), (CONFIGS, "extkd_jax.configs")):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((prefix, *parts))] = path
    return files


MODULES = _module_files()


def layer_of(module: str) -> str:
    if module in API_MODULES:
        return "api"
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add {part!r} to LAYERS (and to docs/design.md)")
    return part


def _imports(module: str, path: pathlib.Path):
    """(target module, line, at module level) of each import of the package in `module`'s source."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.If | ast.Try) for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            if base == "extkd_jax":
                for alias in node.names:
                    if f"extkd_jax.{alias.name}" not in MODULES and alias.name not in ROOT_NAMES:
                        yield f"extkd_jax ({alias.name})", node.lineno, id(node) in top
                targets = [t for t in targets if t != "extkd_jax"]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "extkd_jax" or target.startswith("extkd_jax."):
                yield target, node.lineno, id(node) in top


def _violations() -> list[str]:
    out = []
    for module, path in MODULES.items():
        here = LAYERS.index(layer_of(module))
        for target, line, at_top in _imports(module, path):
            if target.startswith("extkd_jax ("):
                out.append(f"{module}:{line} imports {target} from the package root (only {sorted(ROOT_NAMES)})")
                continue
            if target not in MODULES:
                out.append(f"{module}:{line} imports {target}, which does not exist")
                continue
            if module == "extkd_jax" and not at_top:
                continue  # the root's lazy attributes are the API (test_importing_the_package_imports_no_module)
            there = LAYERS.index(layer_of(target))
            if there > here and not ((module, target) in ALLOWED_LAZY and not at_top):
                where = "at module level" if at_top else "inside a function"
                out.append(f"{module}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)}) {where}")
    return out


def test_no_module_imports_a_later_layer():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a model module importing the engine, at module level or in a function, is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from extkd_jax.train.step import split\n\ndef f():\n    from extkd_jax.experiment import runs\n")
    monkeypatch.setitem(MODULES, "extkd_jax.models.bad", bad)
    found = [v for v in _violations() if v.startswith("extkd_jax.models.bad")]
    assert len(found) == 2 and "at module level" in found[0] and "inside a function" in found[1], found


def test_no_module_passes_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (at most {MAX_LINES} lines each): {long}"


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120
    )


def test_the_package_finds_its_presets_without_editing_its_path(tmp_path):
    """Installed (here: `pip install -e .`), the presets are extkd_jax.configs through setup.cfg's package_dir; the
    checkout's other folders (tests, launch, benchmarks) are not part of the package."""
    if MAPPED:
        pytest.skip("this checkout is not installed (tests/checkout.py mapped its presets): nothing to check")
    code = (
        "import importlib\n"
        "import extkd_jax, extkd_jax.configs.base, extkd_jax.configs.smoke\n"
        "print(list(extkd_jax.__path__) == [extkd_jax.__file__.rpartition('/')[0]])\n"
        "print(extkd_jax.configs.base.get_config().loss.name)\n"
        "for name in ('tests', 'launch', 'benchmarks'):\n"
        "    try:\n"
        "        importlib.import_module('extkd_jax.' + name)\n"
        "        print(name, 'imports')\n"
        "    except ModuleNotFoundError:\n"
        "        print(name, 'absent')\n"
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "True" and lines[2:5] == ["tests absent", "launch absent", "benchmarks absent"], out.stdout
    assert lines[1]  # a loss name: the defaults were read


def test_importing_the_package_imports_no_module(tmp_path):
    out = _python(
        "import sys, extkd_jax; print(sorted(m for m in sys.modules if m.startswith('extkd_jax.')))", tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_checkout_without_an_install_maps_its_presets_for_the_tests(tmp_path):
    """tests/checkout.py: with no install providing extkd_jax.configs (the editable finder taken away, the checkout
    first on sys.path, as pytest puts it on a device copy), the tests' process maps <repo>/configs."""
    code = (
        "import sys, importlib.util\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "print(importlib.util.find_spec('extkd_jax.configs') is None)\n"
        "from tests.checkout import map_checkout_configs\n"
        "print(map_checkout_configs())\n"
        "import extkd_jax.configs.smoke as smoke\n"
        "print(smoke.__file__)\n"
        "print(map_checkout_configs())\n"
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:4] == ["True", "True", str(CONFIGS / "smoke.py"), "False"], out.stdout


# ------------------------------------------------------------------------------------------------ docs/design.md


def _design_section(title: str) -> str:
    text = DESIGN.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/design.md has no section '## {title}'"
    return match.group(1)


ENTRY = re.compile(r"^( *)((?:[\w.]+\.py|[\w]+/)(?:,\s*[\w.]+\.py)*)(?: {2,}|$)")


def documented_modules() -> set[str]:
    """The files named in docs/design.md's module list (the tree under `extkd_jax/`), as paths under extkd_jax/."""
    block = re.search(r"```\n(.*?)```", _design_section("Modules"), re.S).group(1)
    lines = block.splitlines()
    assert lines[0].strip() == "extkd_jax/", lines[0]
    stack: list[tuple[int, str]] = []  # (indent, folder)
    names = set()
    for line in lines[1:]:
        match = ENTRY.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        folder = "/".join(f for _, f in stack)
        for name in re.split(r",\s*", match.group(2)):
            if name.endswith("/"):
                stack.append((indent, name.rstrip("/")))
            else:
                names.add(f"{folder}/{name}" if folder else name)
    return names


def test_design_lists_every_module_and_no_other():
    on_disk = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    on_disk -= {p for p in on_disk if p.endswith("/__init__.py")}  # a package is listed by its folder
    documented = documented_modules()
    assert sorted(on_disk - documented) == [], "modules missing from docs/design.md's module list"
    assert sorted(documented - on_disk) == [], "docs/design.md lists modules that do not exist"


def test_design_states_the_layers_this_test_enforces():
    section = _design_section("Layers")
    stated = re.search(r"^`([^`]+)`", section, re.M)
    assert stated, "docs/design.md's Layers section starts its order with a code span: `a < b < ...`"
    assert tuple(s.strip() for s in stated.group(1).split("<")) == LAYERS
    for module, reason in ALLOWED_LAZY.items():
        assert module[0] in section and module[1] in section, f"docs/design.md does not name the exception {reason}"


def test_the_design_parser_reads_folders_and_lists():
    text = "```\nextkd_jax/\n  a.py   x\n  sub/\n    b.py, c.py   y\n                 d.py is prose\n  e.py\n```"
    match = [ENTRY.match(line) for line in text.splitlines()[2:]]
    assert [m.group(2) if m else None for m in match] == ["a.py", "sub/", "b.py, c.py", None, "e.py", None]
