"""The Wan2.2 latent space's per-channel statistics: the DiT works on normalised latents (z − mean)/std."""

import torch

# fmt: off
MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# fmt: on


def _stats(like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) as [1, 48, 1, 1, 1]; 1/std is taken in float32 first, as the official code does."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=like.device)
    inv_std = 1.0 / torch.tensor(STD, dtype=torch.float32, device=like.device)
    return mean.to(dtype).view(1, -1, 1, 1, 1), inv_std.to(dtype).view(1, -1, 1, 1, 1)


def normalize(mu: torch.Tensor, stats_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """VAE mean -> DiT latent: (mu − mean)·(1/std)."""
    mean, inv_std = _stats(mu, stats_dtype)
    return (mu - mean) * inv_std


def denormalize(z: torch.Tensor, stats_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DiT latent -> VAE latent: z / (1/std) + mean (not z·std + mean: the official form, ~8e-4 apart),
    computed with ``stats_dtype`` statistics and returned in z's dtype."""
    mean, inv_std = _stats(z, stats_dtype)
    return (z / inv_std + mean).to(z.dtype)
