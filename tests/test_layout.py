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


# Inside pipeline/: a module may import its own subpackage or one of a lower level, never one above or beside
# (so no import cycle between subpackages is possible).
PIPELINE_LEVELS = {"": 3, "sampling": 2, "dit": 1, "codecs": 1, "media": 0, "weights": 0}


def pipeline_violations(root) -> list[str]:
    """Every import inside ``root``/pipeline that goes up, or sideways to a subpackage of the same level."""
    pipeline = root / "pipeline"
    subpackages = {p.name for p in pipeline.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(PIPELINE_LEVELS) - {""}, "each pipeline/ subpackage needs a level here"

    def part(target: list[str]) -> str:  # the subpackage a module path lies in; "" = pipeline/ itself
        return target[1] if len(target) > 1 and target[1] in subpackages else ""

    found = []
    for path in sorted(pipeline.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        here = part(parts)
        for level, name in imports_of(path):
            base = parts[:-1]
            target = base[: len(base) - (level - 1)] + [p for p in name.split(".") if p]
            if level == 0 or target[0] != "pipeline" or part(target) == here:
                continue
            if PIPELINE_LEVELS[part(target)] >= PIPELINE_LEVELS[here]:
                found.append(f"{path.relative_to(root)} imports pipeline/{part(target) or '(top)'}")
    return found


def test_pipeline_subpackages_import_only_downwards():
    assert pipeline_violations(ROOT) == []


def test_layering_check_finds_upward_and_sideways_imports(tmp_path):
    for package in PIPELINE_LEVELS:
        (tmp_path / "pipeline" / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / package / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "dit" / "model.py").write_text("from ..sampling.sizes import FPS\n")
    (tmp_path / "pipeline" / "codecs" / "vae.py").write_text("from ..dit import model\n")
    (tmp_path / "pipeline" / "media" / "files.py").write_text("from .. import runner\nfrom . import frames\n")
    (tmp_path / "pipeline" / "sampling" / "loops.py").write_text("from ..dit.model import MagiDiT\n")
    assert pipeline_violations(tmp_path) == [
        "pipeline/codecs/vae.py imports pipeline/dit",
        "pipeline/dit/model.py imports pipeline/sampling",
        "pipeline/media/files.py imports pipeline/(top)",
    ]


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


MAX_PARAMETERS = 8  # beyond this a function takes a small request object instead


def test_no_function_in_pipeline_or_nodes_takes_more_than_eight_parameters():
    too_many = []
    for path in package_files("pipeline") + package_files("nodes"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                if count > MAX_PARAMETERS:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}() takes {count}")
    assert too_many == []
