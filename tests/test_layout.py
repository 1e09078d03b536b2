"""The pack's layout rules: relative imports only, one import direction, importable without ComfyUI."""

import ast
import importlib
import pkgutil
import sys

import magihuman
from conftest import ROOT

OUR_FOLDERS = ("fp8", "pipeline", "nodes", "benchmarks")
STDLIB = set(sys.stdlib_module_names)


def imports_of(path):
    """Yield (level, top-level name or relative target) for every import in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield 0, node.module.split(".")[0]
            else:
                yield node.level, node.module or ""


def package_files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def relative_target(path, level, module):
    """The top folder of the pack that a relative import reaches (``fp8``, ``pipeline``, ``.`` = root)."""
    parts = list(path.relative_to(ROOT).parent.parts)
    base = parts[: len(parts) - (level - 1)]
    target = base + [p for p in module.split(".") if p]
    return target[0] if target else "."


def test_no_absolute_import_of_our_own_folders():
    for folder in OUR_FOLDERS:
        for path in package_files(folder):
            for level, name in imports_of(path):
                assert not (level == 0 and name in OUR_FOLDERS + ("magihuman",)), (
                    f"{path.relative_to(ROOT)} imports '{name}' absolutely; use a relative import"
                )


def test_fp8_imports_only_torch_safetensors_numpy_and_stdlib():
    allowed = {"torch", "safetensors", "numpy"} | STDLIB
    for path in package_files("fp8"):
        for level, name in imports_of(path):
            if level == 0:
                assert name in allowed, f"{path.relative_to(ROOT)} imports '{name}'"
            else:
                assert relative_target(path, level, name) == "fp8", f"{path.relative_to(ROOT)} leaves fp8/"


def test_pipeline_never_imports_comfyui_or_nodes():
    for path in package_files("pipeline"):
        for level, name in imports_of(path):
            if level == 0:
                assert name not in {"comfy", "comfy_api", "comfy_extras", "folder_paths", "latent_preview"}, (
                    f"{path.relative_to(ROOT)} imports ComfyUI ('{name}')"
                )
            else:
                assert relative_target(path, level, name) in {"pipeline", "fp8"}, (
                    f"{path.relative_to(ROOT)} imports outside pipeline/ and fp8/"
                )


def test_whole_pack_imports_without_comfyui_and_never_as_top_level_names():
    assert "comfy" not in sys.modules
    for folder in ("fp8", "pipeline"):
        package = importlib.import_module(f"magihuman.{folder}")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"magihuman.{folder}."):
            importlib.import_module(info.name)
    assert not hasattr(magihuman, "comfy_entrypoint"), "node adapters must only load inside ComfyUI"
    # (pytest itself imports the root __init__.py under the checkout's folder name to look for package-level
    # setup functions; that is harmless. What must never happen is one of our folders becoming top-level.)
    for name in OUR_FOLDERS:
        module_file = getattr(sys.modules.get(name), "__file__", None) or ""
        assert not module_file.startswith(str(ROOT / name)), f"'{name}' was imported as a top-level module"
