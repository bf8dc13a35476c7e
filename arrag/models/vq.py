"""VQ image tokenizer access for transformers' `JanusVQVAE`: images <-> token grids, codebook and latents.

Quantisation rule. Janus-Pro's image tokenizer is LlamaGen's VQ-16 (`janus/models/vq_model.py`:
`ModelArgs.codebook_l2_norm = True`, which `VQ_16` does not override). With that flag the quantizer
L2-normalises both the continuous latent z (after `quant_conv`) and the codebook before taking the nearest
code, and `get_codebook_entry` decodes from the normalised codebook. transformers' port keeps the decode side
(`JanusVQVAEVectorQuantizer.get_codebook_entry` normalises) but its `forward` / `JanusVQVAE.encode` take the
argmin over the *raw* z and codebook, so tokens from `encode` do not match the codes the checkpoint was
trained with, and decode differently. The real checkpoint (`deepseek-community/Janus-Pro-1B`) therefore needs
``l2_normalized=True`` (the default here); ``l2_normalized=False`` reproduces transformers' `encode` (and, for
decoding, the raw codebook of a VQ trained without normalisation).

The official AR-RAG retrieval database keys patches on the L2-normalised continuous latents
(`encode_latents(..., l2_normalized=True)`, 8-d for Janus-Pro) and queries with normalised codebook vectors
of already generated neighbour tokens (`codebook_vectors(..., normalized=True)`); its Show-o (O) database keys on
the raw +-1 LFQ vectors of MAGVIT-v2, which `codebook_vectors` returns unnormalised.

Images are [B, 3, H, W] floats in [-1, 1]; token grids are [B, h, w] long with h = H / 2 ** (levels - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arrag.models import magvit2


def is_magvit2(vq_model: nn.Module) -> bool:
    """Whether the tokenizer is Show-o's MAGVIT-v2 (else a JanusVQVAE)."""
    return isinstance(vq_model, magvit2.Magvit2)


def codebook_vectors(vq_model: nn.Module, normalized: bool = True) -> torch.Tensor:
    """The codebook [V, d], L2-normalised per code when `normalized`. MAGVIT-v2: its raw +-1 LFQ vectors either way,
    the official O keys (`img2code_O.py` stores the quantised states); normalising them would divide every squared
    distance by the code bits K (13), and so change what a DAiD tau means."""
    if is_magvit2(vq_model):
        return magvit2.codebook_vectors(vq_model)
    weight = vq_model.quantize.embedding.weight
    return F.normalize(weight, dim=-1) if normalized else weight


def encode_latents(vq_model: nn.Module, images: torch.Tensor, l2_normalized: bool = True) -> torch.Tensor:
    """Continuous pre-quantisation latents z [B, h, w, d] (encoder -> quant_conv), L2-normalised if asked."""
    if is_magvit2(vq_model):
        z = magvit2.encode_latents(vq_model, images)
    else:
        images = images.to(vq_model.quant_conv.weight.dtype)
        z = vq_model.quant_conv(vq_model.encoder(images)).permute(0, 2, 3, 1)
    return F.normalize(z, dim=-1) if l2_normalized else z


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest (squared L2) code for each vector of z [..., d] given codebook [V, d] -> [...]."""
    flat = z.reshape(-1, z.shape[-1])
    distances = flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(-1)
    return distances.argmin(-1).reshape(z.shape[:-1])


def quantize_latents(vq_model: nn.Module, z: torch.Tensor, l2_normalized: bool = True) -> torch.Tensor:
    """Latents z [B, h, w, d] of `encode_latents` -> token grids [B, h, w]: the nearest code (see the module
    docstring for the rule); MAGVIT-v2: the LFQ signs of z (normalising z does not change them)."""
    if is_magvit2(vq_model):
        return vq_model.quantize.codes(z.permute(0, 3, 1, 2))
    return nearest_codes(z, codebook_vectors(vq_model, l2_normalized).to(z.dtype))


@torch.no_grad()
def encode_images(vq_model: nn.Module, images: torch.Tensor, l2_normalized: bool = True) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> token grids [B, h, w] (`encode_latents`, then `quantize_latents`)."""
    return quantize_latents(vq_model, encode_latents(vq_model, images, l2_normalized), l2_normalized)


@torch.no_grad()
def decode_tokens(vq_model: nn.Module, tokens: torch.Tensor, l2_normalized: bool = True) -> torch.Tensor:
    """Token grids [B, h, w] -> images [B, 3, H, W] clamped to [-1, 1].

    With `l2_normalized` this is `JanusVQVAE.decode` (normalised codebook) for any grid size. MAGVIT-v2 decodes
    its LFQ vectors.
    """
    if is_magvit2(vq_model):
        return magvit2.decode_tokens(vq_model, tokens)
    quant = codebook_vectors(vq_model, l2_normalized)[tokens].permute(0, 3, 1, 2).contiguous()  # [B, d, h, w]
    images = vq_model.decoder(vq_model.post_quant_conv(quant))
    return images.clamp(-1.0, 1.0)
