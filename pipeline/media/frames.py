"""Decoded video in the shapes users need: ComfyUI IMAGE batches, uint8 frames for files, and reference
images prepared for the VAE encoder."""

import torch
import torch.nn.functional as F

from ...fp8.errors import InputError

MIN_IMAGE_SIDE = 16  # smaller reference pictures carry no usable face and break the crop-and-resize


def to_image(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, T, H, W] in [−1, 1] -> ComfyUI IMAGE [T, H, W, 3] float32 in [0, 1], on the CPU.

    Frame by frame into the CPU result: the device holds one float32 frame at a time, not a chain of
    whole-clip float32 copies (3.1 GB each for a 1080p 5 s clip)."""
    _, _, frames, height, width = video.shape
    image = torch.empty(frames, height, width, 3, dtype=torch.float32)  # [T, H, W, 3]
    for t in range(frames):
        frame = video[0, :, t].float().mul_(0.5).add_(0.5).clamp_(0, 1)  # [3, H, W]
        image[t] = frame.permute(1, 2, 0)
    return image


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoder output -> [T, H, W, 3] uint8, truncating like the official writer (x·255, then floor)."""
    return (to_image(video) * 255).to(torch.uint8)


def check_image_size(height: int, width: int, what: str = "the reference image") -> None:
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputError(
            f"{what} is {width}x{height} pixels; it needs at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (a "
            "photo of the person's face and upper body works best)"
        )


def check_reference_image(image, what: str = "the reference image") -> None:
    """An IMAGE [B, H, W, 3|4] or [H, W, 3|4] with values in 0..1, at least 16x16 pixels."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-1] not in (3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{what} must be an IMAGE [batch, height, width, 3]; got {shape}")
    if image.ndim == 4 and image.shape[0] == 0:
        raise InputError(f"{what} is an empty IMAGE batch")
    check_image_size(image.shape[-3], image.shape[-2], what)
    first = image[0] if image.ndim == 4 else image
    if not bool(torch.isfinite(first).all()):
        raise InputError(f"{what} holds NaN or Inf pixel values")


def image_to_video_input(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A reference picture ([H, W, 3] or ComfyUI IMAGE [B, H, W, 3] in [0, 1]; the first of a batch) ->
    [1, 3, 1, height, width] in [−1, 1]: centre-cropped to the target aspect (keeping the full width or the
    full height), then resized with antialiased bicubic filtering."""
    check_reference_image(image)
    if image.ndim == 4:
        image = image[0]
    h, w = image.shape[:2]
    if h / w > height / width:  # taller than the target: keep the width
        crop_h, crop_w = int(w * height / width), w
    else:
        crop_h, crop_w = h, int(h * width / height)
    crop_h, crop_w = max(crop_h, 1), max(crop_w, 1)  # an extreme aspect still keeps one row or column
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    picture = image[top : top + crop_h, left : left + crop_w, :3].permute(2, 0, 1).unsqueeze(0).float()
    if (crop_h, crop_w) != (height, width):
        picture = F.interpolate(
            picture, size=(height, width), mode="bicubic", antialias=True, align_corners=False
        )
    return (picture.clamp(0, 1) * 2 - 1).unsqueeze(2)  # [1, 3, 1, H, W]
