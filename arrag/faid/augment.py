"""FAiD inside the backbone: m chained blenders on chosen decoder layers, fed with retrieved patches.

Placement (paper C.2: m is the *number* of blenders): layers floor(j * L / m), j = 0..m-1, i.e. every L/m
layers from layer 0. The official code (`layer_idx % (24 // num_blender) == 0`) gives the same layers when m
divides L (m = 2 on 24 layers: 0 and 12) and more than m blenders otherwise; here m is always the count.

Chaining (paper §1, official `LlamaDecoderLayer`): the first blender's patches are the retrieved tokens
embedded as the backbone embeds image tokens (generation embedding -> aligner; an invalid retrieval, -1, is a
zero patch); each later blender takes the previous one's carry (score x refined feature). Every blender
normalises its input patches with its own RMSNorm.

The blenders plug into the decode loop's layer modules (`arrag.models.janus`): `teacher_forced_modules` for
training (retrievals of every position given), `decode_modules` for generation (one retrieval per step for
the whole batch, by the first blender). Only the conditional CFG rows are augmented unless
`blend_unconditional` (the official code zeroes the unconditional residual).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from arrag.faid.blender import INITIALISATIONS, Blender, hop_levels
from arrag.models.janus import JanusBackbone


@dataclass(frozen=True)
class FAiDSettings:
    """Blender hop levels (e.g. '12'), number of blenders m, retrieved patches per position k (paper: 10),
    whether the unconditional CFG rows are augmented too (official: no), and the blenders' initialisation
    before fine-tuning ('zero' or 'official', see `Blender.reset_parameters`)."""

    hops: str = "12"
    m: int = 2
    k: int = 10
    blend_unconditional: bool = False
    init: str = "zero"

    def __post_init__(self) -> None:
        hop_levels(self.hops)
        if self.init not in INITIALISATIONS:
            raise ValueError(f"FAiD init {self.init!r}: choose one of {INITIALISATIONS}")
        if self.m < 1 or self.k < 1:
            raise ValueError(f"FAiD needs m >= 1 and k >= 1, got m={self.m}, k={self.k}")


def blender_layers(num_layers: int, m: int) -> list[int]:
    """Decoder layers of m blenders spread over num_layers layers: [floor(j * L / m) for j < m]."""
    if not 1 <= m <= num_layers:
        raise ValueError(f"FAiD m={m} blenders do not fit a {num_layers}-layer decoder (1 <= m <= {num_layers})")
    return [j * num_layers // m for j in range(m)]


def embed_patches(backbone: JanusBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """Retrieved tokens [...] (-1 invalid) -> patches [..., D] as the backbone embeds image tokens; zero for -1."""
    embedded = backbone.model.prepare_embeddings_for_image_generation(tokens.clamp(min=0))
    return embedded * (tokens >= 0).unsqueeze(-1).to(embedded.dtype)


class FAiD(nn.Module):
    """The trainable part of FAiD for one backbone: `blenders[j]` sits on decoder layer `layers[j]`."""

    def __init__(self, hidden_size: int, num_layers: int, grid: int, settings: FAiDSettings, eps: float = 1e-6):
        super().__init__()
        self.settings = settings
        self.layers = blender_layers(num_layers, settings.m)
        self.blenders = nn.ModuleList(Blender(hidden_size, grid, settings.hops, eps, settings.init)
                                      for _ in self.layers)
        self.enabled = True  # False: every layer module returns no residual (the vanilla backbone)
        self._table: dict[str, torch.Tensor] | None = None
        self.retrieval_seconds = 0.0

    @classmethod
    def for_backbone(cls, backbone: JanusBackbone, settings: FAiDSettings) -> FAiD:
        lm = backbone.model.config.text_config
        return cls(lm.hidden_size, lm.num_hidden_layers, backbone.grid_size, settings, lm.rms_norm_eps)

    def train(self, mode: bool = True):
        if mode:
            self._table = None
        return super().train(mode)

    @torch.no_grad()
    def prepare_inference(self, backbone: JanusBackbone) -> None:
        """Eval mode and the fast-path caches: composed kernels of every blender, and the first blender's
        per-token table (its input patches depend only on the retrieved token)."""
        self.eval()
        for blender in self.blenders:
            blender.freeze()
        codebook = backbone.model.model.generation_embeddings.num_embeddings
        vocabulary = torch.arange(codebook, device=backbone.model.device)
        self._table = self.blenders[0].token_table(embed_patches(backbone, vocabulary).float())

    # ------------------------------------------------------------------------------------------ training
    def teacher_forced_modules(self, backbone: JanusBackbone, retrieved: torch.Tensor,
                               blend_rows: torch.Tensor | None = None) -> dict[int, Callable]:
        """Layer modules for `forward_teacher_forced`: retrieved [B, N, K] tokens of every position (-1 invalid);
        `blend_rows` [B] bool (None: all) selects the rows that get the residual (e.g. not caption-dropped rows,
        which stand for the unconditional CFG branch)."""
        carry: dict[str, torch.Tensor] = {}

        def module(index: int, states: torch.Tensor, tokens: torch.Tensor, step: None) -> torch.Tensor | None:
            if not self.enabled:
                return None
            if index == 0:
                carry["patches"] = embed_patches(backbone, retrieved).to(states.dtype)
            residual, carry["patches"] = self.blenders[index](states, carry["patches"])
            if blend_rows is not None:
                residual = residual * blend_rows[:, None, None].to(residual.dtype)
            return residual

        return {layer: partial(module, j) for j, layer in enumerate(self.layers)}

    # ------------------------------------------------------------------------------------------ generation
    def decode_modules(self, backbone: JanusBackbone,
                       retrieve: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[int, Callable]:
        """Layer modules for `generate_tokens`: at step t the first blender calls retrieve(tokens [B, t], t) ->
        [B, K] tokens (-1 invalid) once for the batch; later blenders take the carry. Uses the fast-path caches
        when `prepare_inference` ran (and the module is in eval mode)."""
        carry: dict[str, torch.Tensor] = {}

        def module(index: int, states: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor | None:
            if not self.enabled:
                return None
            blender = self.blenders[index]  # states stay in the model's dtype: only the taps are cast
            if index == 0:
                started = time.perf_counter()
                retrieved = retrieve(tokens, step).to(states.device)
                self.retrieval_seconds += time.perf_counter() - started
                if self._table is not None and not self.training:
                    residual, carry["patches"] = blender.step_from_table(states, retrieved, self._table, step)
                    return residual
                carry["patches"] = embed_patches(backbone, retrieved).float()
            residual, carry["patches"] = blender.step(states, carry["patches"], step)
            return residual

        return {layer: partial(module, j) for j, layer in enumerate(self.layers)}


def index_retriever(index, k: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """retrieve(tokens [B, t], t) -> [B, k] tokens from a `PatchIndex` (k nearest patches, duplicates kept as
    the official code; ties drawn as `arrag.patchdb.scan` draws them)."""
    def retrieve(tokens: torch.Tensor, step: int) -> torch.Tensor:
        return index.retrieve(tokens, step, k)[0]

    return retrieve
