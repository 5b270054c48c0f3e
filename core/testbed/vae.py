"""The testbed's autoencoder: a fixed colour transform and 8x pooling, no learned weights.

Encode: ``(B, 3, 256, 256)`` RGB in [-1, 1] -> 8x8 average pool -> ``latent = M @ rgb`` with
``M`` a 4x3 matrix of orthonormal columns (the first three columns of a 4x4 Hadamard matrix,
halved) -> ``(B, 4, 32, 32)``. Decode: ``rgb = M^T @ latent`` -> nearest-neighbour 8x upsampling
(so averaging a decoded image over 8x8 blocks gives back exactly the 32x32 thumbnail).

So the diffusion model lives in the 4-channel, 1/8-size latent space that Stable Diffusion and
ComfyUI's stock EmptyLatentImage use, while the image content it memorizes is exactly the
32x32 thumbnail (``decode_thumbnail`` skips the upsampling). The config carries
``block_out_channels`` of length 4 and ``scaling_factor`` so diffusers' StableDiffusionPipeline
derives the usual VAE scale factor of 8 from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

_HADAMARD_COLUMNS = [[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]


class _LatentDist:
    """Deterministic stand-in for a diagonal Gaussian posterior (AutoencoderKL's API)."""

    def __init__(self, latents: torch.Tensor) -> None:
        self.latents = latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


class _EncoderOutput:
    def __init__(self, latents: torch.Tensor) -> None:
        self.latent_dist = _LatentDist(latents)


class PooledColorAutoencoder(ModelMixin, ConfigMixin):
    """Fixed linear autoencoder between 256x256 RGB and 4x32x32 latents (see module doc)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        downscale: int = 8,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] = (1, 1, 1, 1),
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        if (in_channels, latent_channels) != (3, 4):
            raise ValueError("PooledColorAutoencoder maps 3 image channels to 4 latent channels")
        if 2 ** (len(block_out_channels) - 1) != downscale:
            raise ValueError("block_out_channels must have log2(downscale) + 1 entries")
        self.register_buffer("color_matrix", 0.5 * torch.tensor(_HADAMARD_COLUMNS))  # (4, 3)

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> _EncoderOutput:
        """``images``: (B, 3, H, W) in [-1, 1], H and W multiples of ``downscale``."""
        return _EncoderOutput(self.encode_thumbnail(F.avg_pool2d(images, self.config.downscale)))

    def encode_thumbnail(self, thumbnails: torch.Tensor) -> torch.Tensor:
        """``thumbnails``: (B, 3, h, w) RGB in [-1, 1] at latent resolution -> (B, 4, h, w)."""
        return torch.einsum("lc,bchw->blhw", self.color_matrix.to(thumbnails.dtype), thumbnails)

    def decode_thumbnail(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents``: (B, 4, h, w) -> (B, 3, h, w) RGB in [-1, 1] at latent resolution."""
        rgb = torch.einsum("lc,blhw->bchw", self.color_matrix.to(latents.dtype), latents)
        return rgb.clamp(-1.0, 1.0)

    def decode(
        self, latents: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """``latents``: (B, 4, h, w) -> (B, 3, 8h, 8w) RGB in [-1, 1]."""
        image = F.interpolate(self.decode_thumbnail(latents), scale_factor=self.config.downscale,
                              mode="nearest")
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images).latent_dist.latents).sample
