"""AR-RAG on a masked backbone (Show-o, paper Appendix B.2): DAiD and FAiD on MaskGIT decoding, and FAiD's training
data from Show-o's noising process.

Show-o decides many positions per step, in no fixed order, so the autoregressive pieces change in three ways:

* Queries. Every still-masked position of the partially decoded grid is a target; its query is the "O"
  neighbourhood (all surrounding cells, `arrag.patchdb.neighbourhood`) with masked neighbours MISSING, i.e. zero
  vectors as the paper pads (or, under the index's `skip` edge policy, no query at the grid's border). One index
  search serves every (image, masked position) pair of a step (`retrieve_masked`). Decoded positions are never
  queried: the decoder keeps them whatever their distribution.
* DAiD (`MaskedDAiDHook`, Show-o's `prob_hook`): Eq. 2-4 position by position on the masked rows, at the steps
  the caller passes as `hook_steps` (the paper: `final_half(steps)`).
* FAiD (`masked_blend`, `masked_decode_modules`, `masked_teacher_forced_modules`): the blenders of
  `arrag.faid.blender` (same parameters: two convolutions of kernel h+1 per hop level h, softmax level weights,
  compatibility MLP + sigmoid, RMSNorm on the input patches), applied to every position at once with the full,
  non-causal window. The window of cell i holds the layer's normalised hidden states of its *decoded* neighbours;
  masked neighbours are zero (as not-yet-generated cells in the autoregressive case) and the centre holds the
  retrieved patch. Residuals go to the masked positions only (the ones being predicted); decoded positions keep
  their hidden states. At generation the blenders act in the final half of the steps only.

Masked window, computed without materialising a window per (position, patch). The two convolutions have no
nonlinearity between them, so with the centre cell's content split off,

    refined_ik = sum_h w_h conv2_h(conv1_h(window_h(i) with centre e_ik)) = C_i + M e_ik,
    C_i = sum_h w_h conv2_h(conv1_h(pad_h(X)))_i,    M = sum_h w_h (centre tap of conv2_h o conv1_h)

where X is the grid of hidden states with every masked cell zeroed (the target cell is masked, so the centre of its
own window is zero in X as the split needs). C is two ordinary padded convolutions over the whole grid per level:
the decoded mask varies per image and step, but it acts on the *input* cells only, so zeroing them once serves
every window. `centre_tap` composes M (D x D) from the two kernels. Per blender, per image and step at paper scale
(Show-o 512: D = 2048, 32 x 32 grid, hops 12, k = 10): C costs 28,072 D^2 = 118 GMAC, M e and the score MLP's first
layer 2 * 10,240 D^2 = 86 GMAC, against about 2,900 GMAC for one CFG step of the backbone (2 rows of 1,155 tokens,
1.26 GMAC per token): about 7 % per blender on the final-half steps. M itself costs 13 D^3 = 112 GMAC, batch
independent: composed once per generation run, once per forward in training (where it carries gradients;
composing the whole 5 x 5 kernel by convolution would cost 2,242 GMAC). The direct computation (two convolutions on each
of the N k windows) costs 110 D^2 per window, 4,724 GMAC per image, more than the backbone step itself, and holds
N k windows of D x 5 x 5 (2.1 GB per image): fine at Shapes scale, where `tests/test_masked.py` uses it as the
reference.

Training (`noised_retrievals`, `masked_faid_loss`): Show-o's noising as its training does (official
`mask_or_random_replace_tokens`: r ~ U(0, 1) per image, mask ratio schedule(r), round(N * ratio) >= 1 positions
masked uniformly at random), retrievals for every masked position from the noised grid (exactly the queries
decoding builds at that mask state), cross-entropy on the masked positions; caption-dropped rows get the empty
caption and no blending, as `arrag.faid.train.faid_loss`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from arrag.daid import DAiDSettings, merge_distributions
from arrag.faid.augment import FAiD, FAiDSettings
from arrag.faid.blender import Blender
from arrag.models.showo import (
    ShowoBackbone,
    attention_bias,
    final_half,
    image_logits,
    load_showo,
    t2i_input_ids,
    text_ids,
)
from arrag.patchdb.encode import vq_geometry
from arrag.patchdb.index import PatchIndex
from arrag.patchdb.neighbourhood import MISSING, neighbours, token_vectors, usable_cells
from arrag.split_tokens import image_tokens
from arrag.training.finetune import (
    ADAPTER_FILE,
    FinetuneConfig,
    distributed_rank,
    finetune,
    finetune_pairs,
    load_finetuned,
)
from arrag.training.showo import load_showo_tokenizer, mask_tokens, masked_token_loss
from evaluators.io import sha256_file, write_json_atomic

# ---------------------------------------------------------------------------------------------------------- retrieval


def check_masked_index(index: PatchIndex, grid: int | None = None, codebook_size: int | None = None) -> None:
    """Refuse an index that masked decoding cannot query: keys other than the "O" neighbourhood (an "L" key
    describes only the cells before a position in raster order, which a masked decoder does not fill first), or
    another grid side / codebook size than the backbone's (when given)."""
    spec = index.spec
    if spec.neighbourhood != "O":
        raise ValueError(f"masked decoding needs an index keyed by the 'O' neighbourhood (all surrounding cells); "
                         f"this one is keyed by '{spec.neighbourhood}' (hops {spec.hops}): rebuild it with "
                         f"neighbourhood O")
    if grid is not None and index.grid != grid:
        raise ValueError(f"the index was built on {index.grid} x {index.grid} grids, the backbone decodes "
                         f"{grid} x {grid}")
    if codebook_size is not None and len(index.codebook) != codebook_size:
        raise ValueError(f"the index has {len(index.codebook)} codebook vectors, the backbone {codebook_size} codes")


def undecided(grid: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """[B, N] bool: positions of decoding grids [B, N] that hold no codebook id (the mask token, or -1)."""
    return (grid < 0) | (grid >= codebook_size)


def retrieve_masked(index: PatchIndex, grid: torch.Tensor, masked: torch.Tensor, k: int, distinct: str | None,
                    salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k retrieval (`PatchIndex.search` with `distinct` and `salt`) for every masked position of grids [B, N]
    (raster order) with one index search.

    A query is the index's neighbourhood of the grid with the masked cells MISSING (zero vectors, or no query
    where the `skip` edge policy stores no key). Positions with the same neighbour tokens share one query (early in
    decoding most neighbourhoods are all masked), and so one draw among tied patches. Returns (tokens [B, N, k]
    long, -1 where none: decoded positions, positions without a usable key, unfilled results; squared L2 distances
    [B, N, k], inf there), on the CPU.
    """
    batch, n = grid.shape
    side = index.grid
    if side * side != n:
        raise ValueError(f"grids of {n} positions, but the index was built on {side} x {side} grids")
    masked = masked.cpu()
    known = torch.where(masked, MISSING, grid.cpu().long()).view(batch, side, side)
    targets = masked & usable_cells(side, index.spec).flatten().unsqueeze(0)  # [B, N]
    tokens = torch.full((batch, n, k), -1, dtype=torch.long)
    distances = torch.full((batch, n, k), float("inf"))
    if targets.any():
        slot_tokens = neighbours(known, index.spec, MISSING).flatten(1, 2)[targets]  # [M, S]
        queries, inverse = torch.unique(slot_tokens, dim=0, return_inverse=True)
        found, found_distances = index.search(token_vectors(queries, index.codebook).flatten(1), k, distinct, salt)
        tokens[targets], distances[targets] = found[inverse], found_distances[inverse]
    return tokens, distances


# ---------------------------------------------------------------------------------------------------------- DAiD


class MaskedDAiDHook:
    """Show-o's `prob_hook` for DAiD (Appendix B.2): at each call, every masked position of every image gets its
    retrieved tokens (`settings.retrieval`; the default, the distinct tokens of the top-k patches, as the official
    DAiD) from one search salted with the step, and its row of probs is merged
    with them (Eq. 2-4, `merge_distributions` on the [B * N', C] masked rows); decoded positions are left as they
    are. Pass ``hook_steps=final_half(steps)`` to `generate_tokens` for the paper's schedule. `seconds` accumulates
    the time spent retrieving, `steps_seen` the steps it was called at."""

    def __init__(self, index: PatchIndex, settings: DAiDSettings):
        check_masked_index(index)
        self.index, self.settings = index, settings
        self.seconds = 0.0
        self.steps_seen: list[int] = []

    def __call__(self, probs: torch.Tensor, grid: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        """probs [B, N, C] float32, grid [B, N] (codebook ids, the mask id where masked) -> probs [B, N, C]."""
        batch, n, codebook_size = probs.shape
        check_masked_index(self.index, codebook_size=codebook_size)
        started = time.perf_counter()
        masked = undecided(grid, codebook_size)
        tokens, distances = retrieve_masked(self.index, grid, masked, self.settings.k, self.settings.retrieval, step)
        self.seconds += time.perf_counter() - started
        self.steps_seen.append(step)
        rows = masked.flatten().nonzero().squeeze(1)  # [B * N'] rows of the flattened probs
        flat = probs.reshape(batch * n, codebook_size).clone()
        on_cpu = rows.cpu()
        flat[rows] = merge_distributions(flat[rows], tokens.flatten(0, 1)[on_cpu].to(probs.device),
                                         distances.flatten(0, 1)[on_cpu].to(probs.device), self.settings.tau,
                                         self.settings.lam)
        return flat.view(batch, n, codebook_size)


# ---------------------------------------------------------------------------------------------------------- FAiD


def faid_for_showo(backbone: ShowoBackbone, settings: FAiDSettings) -> FAiD:
    """The trainable FAiD blenders for a Show-o backbone (layers floor(j L / m); hidden size, grid and norm eps
    from its config). The unconditional CFG rows are never blended on Show-o (its layer modules see the
    conditional rows only), so `blend_unconditional` is refused."""
    if settings.blend_unconditional:
        raise ValueError("FAiD on Show-o blends the conditional CFG rows only: blend_unconditional is not supported")
    config = backbone.config
    return FAiD(config.hidden_size, config.num_hidden_layers, config.grid_size, settings, config.layer_norm_eps)


def embed_image_tokens(backbone: ShowoBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """Retrieved codebook ids [...] (-1 invalid) -> patches [..., D] as Show-o embeds image tokens (Eq. 5: its
    input embedding at image_offset + id); zero vectors for -1 (the official embedding of an invalid retrieval)."""
    embedding = backbone.model.showo.get_input_embeddings()
    tokens = tokens.to(embedding.weight.device)
    vectors = embedding(tokens.clamp(min=0) + backbone.config.image_offset)
    return vectors * (tokens >= 0).unsqueeze(-1).to(vectors.dtype)


def centre_tap(blender: Blender) -> torch.Tensor:
    """M [D, D]: what the window's centre cell goes through, sum_h w_h sum_{p,q} W2_h[:, :, p, q] W1_h[:, :, h-p, h-q]
    (the centre tap of the composed kernel conv2_h o conv1_h, mixed over the levels)."""
    weights = blender.level_weights()
    centre = 0.0
    for j in range(len(blender.levels)):
        first, second = blender.first[j].weight, blender.second[j].weight  # [D, D, h+1, h+1]
        centre = centre + weights[j] * torch.einsum("ojpq,jipq->oi", second, first.flip(2, 3))
    return centre


def masked_context(blender: Blender, states: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """C [B, N, D]: for every cell i, sum_h w_h conv2_h(conv1_h(window_h(i))) with the window holding the states
    [B, N, D] of the decoded cells and zeros at masked cells (masked [B, N] bool), outside the grid and at the
    centre when i is masked. Biases included, as the official convolutions add them over zero-padded windows."""
    batch, n, dim = states.shape
    side = blender.grid
    visible = torch.where(masked.unsqueeze(-1), 0.0, states)  # a masked cell's state is never read
    grid = visible.transpose(1, 2).reshape(batch, dim, side, side).contiguous()
    weights = blender.level_weights()
    context = 0.0
    for j, h in enumerate(blender.levels):
        # conv1 over the padded grid gives every (h+1)-window of every target's (2h+1)-window, conv2 reduces them
        context = context + weights[j] * blender.second[j](blender.first[j](F.pad(grid, [h] * 4)))  # [B, D, g, g]
    return context.flatten(2).transpose(1, 2)


def masked_blend(blender: Blender, states: torch.Tensor, masked: torch.Tensor, patches: torch.Tensor,
                 centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One blender on a partially decoded grid (Eq. 6-7 over the full window of decoded neighbours).

    states [B, N, D] (the layer's normalised hidden states), masked [B, N] bool, patches [B, N, K, D] (embedded
    retrievals or the previous blender's carry; zero where none) -> (residual [B, N, D], zero at decoded
    positions; carry [B, N, K, D] for the next blender). Computed in the blender's dtype. `centre`: a cached
    `centre_tap(blender)` (generation), else composed here (training: it carries gradients).
    """
    dtype = blender.first[0].weight.dtype
    centre = centre_tap(blender) if centre is None else centre
    context = masked_context(blender, states.to(dtype), masked)  # [B, N, D]
    refined = context.unsqueeze(2) + blender.norm(patches.to(dtype)) @ centre.T  # [B, N, K, D]
    carry = blender.compatibility(refined) * refined
    residual = carry.mean(dim=2) * masked.unsqueeze(-1).to(dtype)
    return residual, carry


Retrieve = Callable[[torch.Tensor, torch.Tensor, int | None, int | None], torch.Tensor | None]


def masked_modules(backbone: ShowoBackbone, faid: FAiD, retrieve: Retrieve, blend_rows: torch.Tensor | None = None,
                   centres: list[torch.Tensor] | None = None) -> dict[int, Callable]:
    """Show-o layer modules {layer: module} for the chained blenders of `faid`.

    At each forward the first blender calls retrieve(grid [B, N], masked [B, N], step, steps) -> retrieved tokens
    [B, N, K] (-1 invalid), or None for no blending at this step (every module then returns None); later blenders
    take the carry. `blend_rows` [B] bool (None: all) selects the rows that get a residual; `centres` caches each
    blender's `centre_tap`.
    """
    codebook_size = backbone.config.codebook_size
    chain: dict[str, torch.Tensor] = {}

    def module(index: int, states: torch.Tensor, grid: torch.Tensor, step: int | None,
               steps: int | None) -> torch.Tensor | None:
        if not faid.enabled:
            return None
        if index == 0:
            chain.clear()
            masked = undecided(grid, codebook_size)
            retrieved = retrieve(grid, masked, step, steps)
            if retrieved is None:
                return None
            chain["masked"], chain["patches"] = masked, embed_image_tokens(backbone, retrieved.to(states.device))
        if "patches" not in chain:
            return None
        centre = centres[index] if centres is not None else None
        residual, chain["patches"] = masked_blend(faid.blenders[index], states, chain["masked"], chain["patches"],
                                                  centre)
        if blend_rows is not None:
            residual = residual * blend_rows[:, None, None].to(residual.dtype)
        return residual

    return {layer: partial(module, j) for j, layer in enumerate(faid.layers)}


def masked_decode_modules(backbone: ShowoBackbone, faid: FAiD, index: PatchIndex) -> dict[int, Callable]:
    """Layer modules for Show-o's `generate_tokens`: in the final half of the steps (Appendix B.2) the first
    blender retrieves the top-k patches (k = settings.k, duplicates kept as the AR FAiD) of every masked position
    from the current grid, once per step; outside it every module returns None. Retrieval time goes to
    `faid.retrieval_seconds`. Build them after the weights are loaded: each blender's centre tap M is composed
    here once (13 D^3 multiply-adds, 112 G at paper scale, would otherwise cost every step)."""
    check_masked_index(index, backbone.grid_size, backbone.config.codebook_size)
    with torch.no_grad():
        centres = [centre_tap(blender) for blender in faid.blenders]

    def retrieve(grid: torch.Tensor, masked: torch.Tensor, step: int | None, steps: int | None):
        if step is None or steps is None or step not in final_half(steps):
            return None
        started = time.perf_counter()
        retrieved, _ = retrieve_masked(index, grid, masked, faid.settings.k, None, step)
        faid.retrieval_seconds += time.perf_counter() - started
        return retrieved

    return masked_modules(backbone, faid, retrieve, centres=centres)


def masked_teacher_forced_modules(backbone: ShowoBackbone, faid: FAiD, retrieved: torch.Tensor,
                                  blend_rows: torch.Tensor | None = None) -> dict[int, Callable]:
    """Layer modules for a teacher-forced forward (`image_logits` / `forward_teacher_forced`) on noised grids: the
    mask comes from the grid the forward is given, `retrieved` [B, N, K] holds the precomputed retrievals of the
    masked positions (`noised_retrievals`); blending at every call, whatever the step."""
    return masked_modules(backbone, faid, lambda grid, masked, step, steps: retrieved, blend_rows)


# ---------------------------------------------------------------------------------------------------------- training


def noised_retrievals(tokens: torch.Tensor, index: PatchIndex, k: int, generator: torch.Generator,
                      schedule: str = "cosine", distinct: str | None = None) -> dict[str, torch.Tensor]:
    """FAiD training data for token grids [B, N]: one noising draw per row as Show-o's training draws it (a time
    r ~ U(0, 1) per row, then `arrag.training.showo.mask_tokens`) and the top-k retrievals of every masked position
    from the noised grid, one search -> {masked [B, N] bool, retrieved [B, N, k] long (-1 at decoded positions),
    distances [B, N, k]}. Repeat rows for several time steps of one image."""
    check_masked_index(index)
    times = torch.rand(len(tokens), generator=generator)
    _, masked = mask_tokens(tokens, 0, times, generator, schedule)
    retrieved, distances = retrieve_masked(index, tokens, masked, k, distinct)
    return {"masked": masked, "retrieved": retrieved, "distances": distances}


def masked_faid_loss(backbone: ShowoBackbone, batch: dict[str, torch.Tensor], generator: torch.Generator,
                     faid: FAiD, caption_dropout: float) -> torch.Tensor:
    """Cross-entropy on the masked positions of noised grids with FAiD blending (mean over the batch's masked
    positions, as Show-o's ignore_index loss; logits over the codebook as decoding uses them).

    batch: text [b, T] (`text_ids` of the captions), image_tokens [b, N], masked [b, N] bool, retrieved [b, N, K].
    A `caption_dropout` fraction of rows (drawn from `generator`) gets the empty caption and no blending. Plugs into
    `arrag.training.finetune.finetune` as ``partial(masked_faid_loss, faid=faid, caption_dropout=p)``.
    """
    text, tokens = batch["text"], batch["image_tokens"].long()
    masked = batch["masked"].bool()
    dropped = (torch.rand(len(text), generator=generator) < caption_dropout).to(text.device)
    text = torch.where(dropped[:, None], text_ids(backbone, [""]).to(text.device), text)
    grid = torch.where(masked, backbone.config.mask_token_id, tokens)
    input_ids = t2i_input_ids(backbone, text, grid)
    modules = masked_teacher_forced_modules(backbone, faid, batch["retrieved"].long(), blend_rows=~dropped)
    logits = image_logits(backbone, input_ids, attention_bias(backbone, input_ids), grid, modules, None, None)
    return masked_token_loss(logits, tokens, masked)


# ---------------------------------------------------------------------------------------------------------- fine-tuning

SETTINGS_FILE = "faid.json"


def finetune_masked_faid(showo_dir: str | Path, train_dir: str | Path, index_path: str | Path, out_dir: str | Path,
                         checkpoint_dir: str | Path, settings: FAiDSettings, config: FinetuneConfig,
                         caption_dropout: float = 0.1, images: int = 0, noise_draws: int = 1,
                         device: str = "cpu", tokens_file: str | Path | None = None, tokenizer: str | None = None,
                         tokenizer_revision: str | None = None, text_tokenizer: str | None = None) -> dict:
    """Fine-tune FAiD on a Shapes-world Show-o (its folder holds the VQ it was trained with, `vq/`): the first
    `images` training images (0: all), each noised `noise_draws` times as Show-o's training does (the paper
    retrieves for the noised states of several time steps of each instance: every draw is a training row), with
    the top-k retrievals of its masked positions from the O index at `index_path` (`noised_retrievals`, seeded
    by config.seed); then the loop shared with the autoregressive FAiD. The images' tokens come from
    `tokens_file` when given, else are encoded here; the tokenizer is `tokenizer` (paper scale: MAGVIT-v2) or the
    Shapes VQ beside the backbone (`load_showo_tokenizer`), the text tokenizer `text_tokenizer` when given (see
    `load_showo`). Writes `out_dir` (adapter, faid.json, metrics.json); returns the metrics."""
    from arrag.daid import load_index_for

    backbone = load_showo(str(showo_dir), device=device, tokenizer_source=text_tokenizer)
    vq = load_showo_tokenizer(showo_dir, backbone.grid_size, tokenizer, tokenizer_revision)
    records, captions, files = finetune_pairs(train_dir, images)
    tokens = image_tokens(vq, files, vq_geometry(vq)[0], tokens_file)
    index = load_index_for(vq, index_path)
    check_masked_index(index, backbone.grid_size, backbone.config.codebook_size)
    tokens = tokens.repeat(noise_draws, 1)  # row d * n + i: draw d of image i
    noised = noised_retrievals(tokens, index, settings.k, torch.Generator().manual_seed(config.seed))
    examples = {"text": text_ids(backbone, captions).repeat(noise_draws, 1), "image_tokens": tokens,
                "masked": noised["masked"], "retrieved": noised["retrieved"]}
    torch.manual_seed(config.seed)  # blender initialisation
    faid = faid_for_showo(backbone, settings)
    loss_fn = partial(masked_faid_loss, faid=faid, caption_dropout=caption_dropout)
    metrics = finetune(backbone, examples, loss_fn, config, out_dir, checkpoint_dir, extra_modules={"faid": faid},
                       title=f"FAiD fine-tuning on Show-o (hops {settings.hops}, m {settings.m})")
    metrics.update(hops=settings.hops, m=settings.m, k=settings.k, layers=faid.layers, images=len(files),
                   noise_draws=noise_draws,
                   blender_parameters=sum(p.numel() for p in faid.parameters()), caption_dropout=caption_dropout,
                   masked_fraction=float(noised["masked"].float().mean()))
    if distributed_rank()[0] == 0:
        write_json_atomic(Path(out_dir) / SETTINGS_FILE, {
            "settings": asdict(settings), "caption_dropout": caption_dropout, "layers": faid.layers,
            "retrievals": {"index": str(index_path), "images": len(files), "noise_draws": noise_draws}})
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics


def load_masked_faid(backbone: ShowoBackbone, weights_dir: str | Path) -> tuple[FAiD, dict]:
    """Apply `finetune_masked_faid` weights to a freshly loaded Show-o -> (FAiD in eval mode, settings for the
    generation record). Build `masked_decode_modules` afterwards."""
    weights_dir = Path(weights_dir)
    stored = json.loads((weights_dir / SETTINGS_FILE).read_text())
    settings = FAiDSettings(**stored["settings"])
    faid = faid_for_showo(backbone, settings)
    load_finetuned(backbone, weights_dir, extra_modules={"faid": faid})
    faid.eval()
    return faid, {**asdict(settings), "layers": faid.layers, "weights": str(weights_dir),
                  "adapter_sha256": sha256_file(weights_dir / ADAPTER_FILE)}
