"""MAGVIT-v2 image tokenizer of Show-o (`showlab/magvitv2`): convolutional encoder, lookup-free quantiser, decoder.

Images [B, 3, H, W] in [-1, 1] <-> token grids [B, h, w] long, h = H / 2 ** (levels - 1) (256 px -> 16 x 16 with
the official five levels). The functions mirror `arrag.models.vq` (`encode_latents`, `encode_images`,
`decode_tokens`, `codebook_vectors`, each taking the model first), so the Show-o backbone can be paired with
either tokenizer; `arrag.models.vq`'s functions hand a `Magvit2` to them, so the patch database, the split tokens
and generation take either tokenizer (`arrag.patchdb.encode.load_vq` loads both).

Lookup-free quantisation (LFQ) with K bits: the encoder outputs z [B, K, h, w]; channel j gives bit
b_j = [z_j > 0] (zero counts as 0), the token id is sum_j b_j * 2 ** (K - 1 - j) (channel 0 is the most significant
bit), and the quantised vector of id is 2 * b - 1 in {-1, +1}^K. `codebook_vectors` returns these vectors for ids
0 .. 2**K - 1, so quantising a codebook vector gives back its id.

Facts checked (official Show-o code, github.com/showlab/Show-o at 45a5a2d, read for facts, not copied):
- models/modeling_magvitv2.py: `MAGVITv2()` takes no arguments, so the architecture is the defaults of its parts:
  encoder ch=128, ch_mult (1, 2, 2, 4, 4), res blocks per level (4, 3, 4, 3, 4); decoder ch=128, ch_mult
  (1, 1, 2, 2, 4), res blocks per level (4, 4, 3, 4, 3); z_channels = 13 (8192 codes); no timestep embedding;
  attn_resolutions=[5], a resolution never reached, so attention exists only in the middle blocks. The encoder owns
  `quant_conv` (applied last), the decoder owns `post_quant_conv` (applied first). `LFQuantizer` registers
  `embedding` [8192, 13] (MSB-first bits * 2 - 1) and `power_vals` [13] (2 ** (12 .. 0)) as persistent buffers,
  and `get_indices` sums power_vals * [z_q > 0]; `get_code` flattens the grid in raster order.
- models/common_modules.py: GroupNorm(32 groups, eps 1e-6) + swish; ResnetBlock (norm1, conv1, norm2, conv2, and
  a 1x1 `nin_shortcut` when widths differ); AttnBlock (norm, 1x1 q / k / v / proj_out, one head, scale c ** -0.5);
  Downsample = zero pad (0, 1, 0, 1) + 3x3 stride-2 conv; Upsample = nearest x2 + 3x3 conv.
- training/utils.py `image_transform`: pixels normalised with mean = std = 0.5, i.e. to [-1, 1]; inference_t2i.py
  decodes with `decode_code` and clamps (x + 1) / 2 to [0, 1].
- models/modeling_utils.py (diffusers `ModelMixin`): weights are `pytorch_model.bin` or
  `pytorch_model.safetensors` beside a `config.json`.
Not verified without the checkpoint: which weight file `showlab/magvitv2` ships, and that it holds the two LFQ
buffers (the official module's state dict does, so strict loading expects them; `load_magvit2` also checks that
their values follow the bit convention above).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arrag.models.checkpoint import load_strict, read_checkpoint, write_checkpoint

HUB_MAGVIT2 = "showlab/magvitv2"


@dataclass
class Magvit2Config:
    """Architecture; the defaults are the official `MAGVITv2()`. Widths are `channels` x multipliers (GroupNorm(32):
    every width must be a multiple of 32); one downsampling per level after the first."""

    channels: int = 128
    encoder_channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    code_bits: int = 13  # K: z channels, codebook size 2 ** K
    image_size: int = 256  # input side it is used at (it is fully convolutional; ours, not in the official config)

    @property
    def codebook_size(self) -> int:
        return 2**self.code_bits

    @property
    def downsample(self) -> int:
        """Pixels per token side."""
        return 2 ** (len(self.encoder_channel_mult) - 1)


def tiny_magvit2_config(code_bits: int = 6) -> Magvit2Config:
    """Two levels of widths 32 / 64, one res block each: 16 x 16 images -> 8 x 8 grids of 2 ** code_bits codes."""
    return Magvit2Config(
        channels=32,
        encoder_channel_mult=(1, 2),
        encoder_res_blocks=(1, 1),
        decoder_channel_mult=(1, 2),
        decoder_res_blocks=(1, 1),
        code_bits=code_bits,
        image_size=16,
    )


# ----------------------------------------------------------------------------------------------------------
# Building blocks (submodule names follow the official state dict)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h * w positions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c], scale c ** -0.5
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Middle(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    """One resolution level: `block` (a ModuleList) and an optional `downsample` / `upsample`."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample is not None:
        setattr(level, name, resample)
    return level


class Encoder(nn.Module):
    """Images [B, 3, H, W] -> z [B, K, h, w] (conv_in, levels with downsampling, middle, norm, conv_out, quant_conv)."""

    def __init__(self, config: Magvit2Config):
        super().__init__()
        self.conv_in = nn.Conv2d(3, config.channels, 3, padding=1)
        width, levels = config.channels, []
        last = len(config.encoder_channel_mult) - 1
        for i, (mult, n_blocks) in enumerate(zip(config.encoder_channel_mult, config.encoder_res_blocks, strict=True)):
            blocks = []
            for _ in range(n_blocks):
                blocks.append(ResnetBlock(width, config.channels * mult))
                width = config.channels * mult
            levels.append(_level(blocks, Downsample(width) if i < last else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = Middle(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, config.code_bits, 3, padding=1)
        self.quant_conv = nn.Conv2d(config.code_bits, config.code_bits, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Code vectors [B, K, h, w] -> images [B, 3, H, W] (post_quant_conv, conv_in, middle, levels with upsampling,
    norm, conv_out). `up[i]` is level i; levels run from the last (lowest resolution) to 0."""

    def __init__(self, config: Magvit2Config):
        super().__init__()
        mults, n_blocks = config.decoder_channel_mult, config.decoder_res_blocks
        width = config.channels * mults[-1]
        self.post_quant_conv = nn.Conv2d(config.code_bits, config.code_bits, 1)
        self.conv_in = nn.Conv2d(config.code_bits, width, 3, padding=1)
        self.mid = Middle(width)
        levels = []
        for i in reversed(range(len(mults))):
            blocks = []
            for _ in range(n_blocks[i]):
                blocks.append(ResnetBlock(width, config.channels * mults[i]))
                width = config.channels * mults[i]
            levels.insert(0, _level(blocks, Upsample(width) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """Signs of K channels <-> token ids (see the module docstring). Buffers as in the official state dict."""

    def __init__(self, code_bits: int):
        super().__init__()
        powers = 2 ** torch.arange(code_bits - 1, -1, -1)  # [K] long, most significant bit first
        bits = (torch.arange(2**code_bits).unsqueeze(1) // powers) % 2  # [2**K, K]
        self.register_buffer("embedding", bits.float() * 2 - 1)
        self.register_buffer("power_vals", powers)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, K, h, w] -> token ids [B, h, w]."""
        return ((z > 0).long() * self.power_vals.view(1, -1, 1, 1)).sum(1)

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> code vectors [B, K, h, w] in {-1, +1}."""
        return self.embedding[tokens].permute(0, 3, 1, 2).contiguous()


class Magvit2(nn.Module):
    """The tokenizer: `encoder`, `quantize` (LFQ), `decoder` (state-dict names of the official `MAGVITv2`)."""

    def __init__(self, config: Magvit2Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = LookupFreeQuantizer(config.code_bits)


# ----------------------------------------------------------------------------------------------------------
# Images <-> tokens (same signatures as arrag.models.vq)


def codebook_vectors(model: Magvit2) -> torch.Tensor:
    """The LFQ code vectors [2**K, K] float, row i = the quantiser's output for token id i."""
    return model.quantize.embedding


def encode_latents(model: Magvit2, images: torch.Tensor) -> torch.Tensor:
    """Continuous pre-quantisation latents z [B, h, w, K] of images [B, 3, H, W] in [-1, 1]."""
    images = images.to(model.encoder.conv_in.weight.dtype)
    return model.encoder(images).permute(0, 2, 3, 1)


@torch.no_grad()
def encode_images(model: Magvit2, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> token grids [B, h, w] long."""
    return model.quantize.codes(encode_latents(model, images).permute(0, 3, 1, 2))


@torch.no_grad()
def decode_tokens(model: Magvit2, tokens: torch.Tensor) -> torch.Tensor:
    """Token grids [B, h, w] -> images [B, 3, H, W] clamped to [-1, 1]."""
    z = model.quantize.vectors(tokens).to(model.decoder.conv_in.weight.dtype)
    return model.decoder(z).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Loading and saving


def config_from_json(data: dict) -> Magvit2Config:
    """Config from a checkpoint's config.json: our fields where present, the official defaults otherwise (the
    official config.json carries none, since `MAGVITv2()` takes no arguments)."""
    if data.get("_class_name", "MAGVITv2") != "MAGVITv2":
        raise ValueError(f"config.json describes {data['_class_name']!r}, not MAGVITv2")
    known = {f.name for f in fields(Magvit2Config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return Magvit2Config(**values)


def load_magvit2(
    source: str = HUB_MAGVIT2,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    image_size: int | None = None,
) -> Magvit2:
    """Load from a hub id (pin `revision` to a commit) or a local directory, strictly (see `checkpoint.load_strict`).

    `dtype=None` keeps the checkpoint's floating dtype; `image_size` overrides the config's input side (the
    official config has none: 256 unless given; Show-o 512 uses 512). Returned in eval mode.
    """
    data, state = read_checkpoint(source, revision)
    model = Magvit2(config_from_json({**data, **({"image_size": image_size} if image_size else {})}))
    load_strict(model, state, source)
    reference = LookupFreeQuantizer(model.config.code_bits)
    if not (
        torch.equal(model.quantize.embedding, reference.embedding)
        and torch.equal(model.quantize.power_vals, reference.power_vals)
    ):
        raise ValueError(f"{source!r}: the LFQ buffers do not follow the MSB-first bit convention")
    if dtype is None:
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    return model.to(device=device, dtype=dtype).eval()


def save_magvit2(model: Magvit2, path: str | Path) -> None:
    """Write safetensors + config.json so that `load_magvit2(path)` restores the model."""
    write_checkpoint(model, {"_class_name": "MAGVITv2", **asdict(model.config)}, path)
