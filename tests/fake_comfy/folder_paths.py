"""Stand-in for ComfyUI's folder_paths, pointed at a test's models folder with set_models_dir()."""

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
models_dir = ""
input_directory = ""
temp_directory = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def set_models_dir(path) -> None:
    global models_dir
    models_dir = str(path)
    for name in ("diffusion_models", "vae", "text_encoders", "checkpoints", "loras"):
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], supported_pt_extensions)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[folder_name][0])


def get_filename_list(folder_name: str) -> list[str]:
    paths, extensions = folder_names_and_paths[folder_name]
    found = []
    for base in paths:
        for root, _, files in os.walk(base, followlinks=True):
            for name in files:
                if os.path.splitext(name)[1].lower() in extensions:
                    found.append(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, filename)
        if os.path.exists(path):
            return path
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    paths = folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
    paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_input_directory() -> str:
    return input_directory


def get_temp_directory() -> str:
    return temp_directory
