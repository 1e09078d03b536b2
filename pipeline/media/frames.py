"""Decoded video in the shapes users need: ComfyUI IMAGE batches, uint8 frames for files, and reference
images prepared for the VAE encoder."""

import torch
import torch.nn.functional as F


def to_image(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, T, H, W] in [−1, 1] -> ComfyUI IMAGE [T, H, W, 3] float32 in [0, 1]."""
    return video[0].float().mul(0.5).add(0.5).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoder output -> [T, H, W, 3] uint8, truncating like the official writer (x·255, then floor)."""
    return (to_image(video) * 255).to(torch.uint8)


def image_to_video_input(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A reference picture ([H, W, 3] or ComfyUI IMAGE [B, H, W, 3] in [0, 1]; the first of a batch) ->
    [1, 3, 1, height, width] in [−1, 1]: centre-cropped to the target aspect (keeping the full width or the
    full height), then resized with antialiased bicubic filtering."""
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"a reference image must be [H, W, 3] (or an IMAGE batch); got {list(image.shape)}")
    h, w = image.shape[:2]
    if h / w > height / width:  # taller than the target: keep the width
        crop_h, crop_w = int(w * height / width), w
    else:
        crop_h, crop_w = h, int(h * width / height)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    picture = image[top : top + crop_h, left : left + crop_w, :3].permute(2, 0, 1).unsqueeze(0).float()
    if (crop_h, crop_w) != (height, width):
        picture = F.interpolate(
            picture, size=(height, width), mode="bicubic", antialias=True, align_corners=False
        )
    return (picture.clamp(0, 1) * 2 - 1).unsqueeze(2)  # [1, 3, 1, H, W]
