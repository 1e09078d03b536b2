"""Stand-in for comfy.model_management: CPU devices, interrupt flag, and a record of memory requests."""

import torch


class InterruptProcessingException(BaseException):  # a BaseException since ComfyUI v0.29
    pass


interrupt_processing = False
calls: list[tuple] = []  # (function name, argument summary) of every memory request, for assertions
loaded: list = []


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def supports_fp8_compute(device=None) -> bool:
    return False


total_memory = 64 * 2**30  # tests set it to stand for a smaller card


def get_free_memory(dev=None, torch_free_too=False):
    return 64 * 2**30


def get_total_memory(dev=None, torch_total_too=False):
    return total_memory


def minimum_inference_memory():
    return int(0.8 * 2**30) + 400 * 2**20  # ComfyUI's 0.8 GiB plus its default extra reserve


def free_memory(memory_required, device, keep_loaded=()):
    calls.append(("free_memory", memory_required))


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):  # fmt: skip
    calls.append(("load_models_gpu", {"count": len(models), "memory_required": memory_required,
                                      "force_full_load": force_full_load}))  # fmt: skip
    for patcher in models:
        if patcher not in loaded:
            loaded.append(patcher)


def unload_all_models():
    calls.append(("unload_all_models", len(loaded)))
    for patcher in loaded:
        patcher.model.to(patcher.offload_device)
    loaded.clear()


def soft_empty_cache(force=False):
    pass


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
