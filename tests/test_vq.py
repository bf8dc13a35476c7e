"""VQ tokenizer access: the L2-normalised quantisation rule, its switch, and decoding."""

import pytest
import torch
import torch.nn.functional as F
from transformers import JanusVQVAE, JanusVQVAEConfig

from arrag.models.vq import codebook_vectors, decode_tokens, encode_images, encode_latents


@pytest.fixture(scope="module")
def vq():
    """16x16 images -> 4x4 grids of 64 codes (8-d), with code norms spread over [0.2, 5]."""
    torch.manual_seed(0)
    config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 2],
        num_res_blocks=1,
        num_patches=4,
    )
    model = JanusVQVAE(config).eval()
    with torch.no_grad():
        weight = model.quantize.embedding.weight
        weight.copy_(F.normalize(torch.randn_like(weight), dim=-1) * torch.empty(64, 1).uniform_(0.2, 5.0))
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(4, 3, 16, 16) * 2 - 1


def nearest_code_margin(z: torch.Tensor, codebook: torch.Tensor) -> float:
    """Over all latents z [..., d], in float64: the smallest lead of the nearest code over the second nearest, in
    squared L2. Two float32 routes to the argmin (|z|^2 - 2 z.c + |c|^2 summed in different orders, distances
    <= 26 here) differ by ~1e-5 at most, so a lead above 1e-4 makes every nearest code unambiguous."""
    distances = (z.detach().double()[..., None, :] - codebook.detach().double()).pow(2).sum(-1)
    nearest = distances.topk(2, dim=-1, largest=False).values
    return float((nearest[..., 1] - nearest[..., 0]).min())


def test_shapes_and_normalisation(vq, images):
    latents = encode_latents(vq, images)
    assert latents.shape == (4, 4, 4, 8)
    # float32 normalisation of 8-d vectors: norms within a few ulp (measured 1.2e-7); 1e-5 leaves ~100x
    assert torch.allclose(latents.norm(dim=-1), torch.ones(4, 4, 4), atol=1e-5)
    assert torch.allclose(codebook_vectors(vq).norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.equal(codebook_vectors(vq, normalized=False), vq.quantize.embedding.weight)
    assert encode_images(vq, images).shape == (4, 4, 4)


def test_raw_rule_reproduces_transformers_encode(vq, images):
    with torch.no_grad():
        stock = vq.encode(images).image_tokens.view(4, 4, 4)
    # measured 3.4e-3
    assert nearest_code_margin(encode_latents(vq, images, l2_normalized=False), codebook_vectors(vq, False)) > 1e-4
    assert torch.equal(encode_images(vq, images, l2_normalized=False), stock)


def test_normalised_rule_is_nearest_by_cosine(vq, images):
    assert nearest_code_margin(encode_latents(vq, images), codebook_vectors(vq)) > 1e-4  # measured 2.7e-4
    cosine = encode_latents(vq, images) @ codebook_vectors(vq).T  # [B, h, w, V]
    assert torch.equal(encode_images(vq, images), cosine.argmax(-1))


def test_switch_matters_when_code_norms_vary(vq, images):
    normalised = encode_images(vq, images)
    raw = encode_images(vq, images, l2_normalized=False)
    assert (normalised != raw).any()
    # normalising the rescaled codes rounds them differently (~1e-7): the normalised rule keeps its codes because
    # every nearest code leads by more than that
    assert nearest_code_margin(encode_latents(vq, images), codebook_vectors(vq)) > 1e-4
    weight = vq.quantize.embedding.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(torch.empty(64, 1).uniform_(0.5, 2.0))  # rescaling codes moves only the raw rule
        rescaled_normalised = encode_images(vq, images)
        rescaled_raw = encode_images(vq, images, l2_normalized=False)
        weight.copy_(original)
    assert torch.equal(rescaled_normalised, normalised)
    assert not torch.equal(rescaled_raw, raw)


def test_decode_uses_the_normalised_codebook_like_transformers(vq, images):
    tokens = encode_images(vq, images)
    decoded = decode_tokens(vq, tokens)
    with torch.no_grad():
        stock = vq.decode(tokens.view(4, -1))
    assert decoded.shape == images.shape
    assert torch.allclose(decoded, stock.clamp(-1, 1), atol=1e-5)  # the same operations: measured equal
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert not torch.allclose(decode_tokens(vq, tokens, l2_normalized=False), decoded, atol=1e-3)  # measured: 1 apart
