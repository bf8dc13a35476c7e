"""Janus-Pro backbone: loading, prompt formatting and a batched CFG decode loop with two extension points.

Everything goes through transformers' native Janus classes (`JanusForConditionalGeneration`,
`JanusProcessor`), so the real checkpoint (`deepseek-community/Janus-Pro-1B`, the transformers-native
conversion of `deepseek-ai/Janus-Pro-1B`) and the tiny Shapes-world models share one loading path and one
decode loop.

Text-to-image recipe (official Janus `generation_inference.py`, and transformers' chat template with
`add_generation_prompt=True` followed by `JanusProcessor(..., generation_mode="image")`):

    <bos><|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>

The unconditional prompt keeps BOS and BOI and replaces every other token by the pad token (official code:
`tokens[1:-1] = pad_id`; transformers: every token but BOS/BOI). Classifier-free guidance runs the conditional
rows [0, B) and the unconditional rows [B, 2B) in one batch: logits = uncond + w * (cond - uncond).

Decode step t (t = 0 .. N-1, N = number of image tokens) in `generate_tokens`:

    hidden states -> generation head -> CFG (float32) -> softmax(logits / temperature)
        -> top-k / top-p filter (renormalised) -> prob_hook -> argmax (greedy) or inverse-CDF sample

Extension points (each costs nothing when absent):

* ``prob_hook(probs [B, V] float32, tokens [B, t] long, step: int) -> probs [B, V]``: called at every step
  after CFG, temperature and top-k/top-p, right before the token is chosen; ``tokens`` holds the image tokens
  generated so far (raster order, read-only). The official DAiD code mixes its retrieval distribution at the
  same place (after CFG and temperature; it has no top-k/top-p). Filtering first lets a retrieval distribution
  propose tokens that the model's filter removed. The returned rows need not be normalised for sampling (the
  sampler divides by their sum) but must be non-negative with a positive sum. A hook may also have a method
  ``prefetch(tokens [B, t], step)``: the loop calls it at the start of step t, as soon as the tokens the step
  can depend on are known and before the forward, so that the hook can work in the background meanwhile
  (DAiD's retrieval); ``tokens`` is a copy the hook may keep.

* ``layer_modules: {layer index: nn.Module}`` (FAiD): for each chosen decoder layer the module is called
  after that layer's self-attention and its output is added to the hidden state (after the attention
  residual, before the MLP), as the official FAiD blender does:

  - incremental decode, step t: ``module(states, tokens, t)`` with ``states`` [B, t, D] the layer's
    input-normalised hidden states (output of ``input_layernorm``) of the positions whose *input* is image
    token 0 .. t-1, in raster order (the state of token t-1 is computed in this very step), ``tokens`` [B, t]
    the image tokens generated so far. It returns a residual [B, D] (or None for no change) that is added at
    the position predicting image token t. Only the conditional CFG rows are passed and changed; the
    unconditional rows run unmodified (the official code zeroes the unconditional residual), unless
    `generate_tokens(..., blend_unconditional=True)`, which passes all 2B rows (conditional first).
  - teacher forcing (`forward_teacher_forced`): ``module(states, tokens, None)`` with ``states`` [B, N, D]
    (row j: state of the position whose input is image token j), ``tokens`` [B, N]; it returns [B, N, D] (or
    None) where row i is the residual for the position predicting image token i. Row i must depend only on
    rows / tokens j < i, which is exactly what the incremental call can see; then teacher-forced and
    step-by-step logits agree.

  The decode loop keeps the states per chosen layer in a [B, N, D] buffer beside the KV cache (DynamicCache).

* ``prefix_image_tokens`` [B, M] (RA-CM3, Appendix B.1): image-token ids (e.g. a retrieved image's VQ tokens)
  embedded as the backbone embeds image tokens (`prepare_embeddings_for_image_generation`: generation
  embedding -> aligner) and inserted right after each row's BOS, i.e. before the formatted text prompt:

      <bos> [M retrieved-image embeddings] <|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>

  In `generate_tokens` both CFG branches get the same prefix (the unconditional one: BOS, prefix, pads, BOI),
  so guidance contrasts the caption given the reference and does not amplify the reference itself. Position
  ids count the prefix like any token. With ``prefix_image_tokens=None`` nothing changes.

Per-image randomness: row b draws its N uniforms from ``torch.Generator().manual_seed(seeds[b])`` before
decoding, and step t samples by inverse CDF with the t-th uniform, so an image's tokens depend only on its
prompt, its seed and the sampling settings, never on the rest of the batch. Position ids count from each
row's first real token (left padding does not shift them), as an unpadded official run does; transformers'
`generate` shifts padded rows instead, which RoPE makes equivalent up to rounding (greedy tokens match in the
tests). Greedy decoding takes the argmax of the (hooked) probabilities, i.e. of the CFG logits without a hook.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import (
    DynamicCache,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessor,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)
from transformers.masking_utils import create_causal_mask

from arrag.models.checkpoint import check_safetensors_folder

HUB_JANUS_PRO_1B = "deepseek-community/Janus-Pro-1B"
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
# Janus-Pro's VQ-16 channel multipliers; a prefix of length n downsamples by 2 ** (n - 1)
JANUS_CHANNEL_MULTIPLIER = (1, 1, 2, 2, 4)
IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}
WORD_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

ProbHook = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class SamplingConfig:
    """Decoding settings. Defaults are the official Janus-Pro text-to-image ones (CFG 5, temperature 1)."""

    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most probable tokens (ties at the k-th are kept)
    top_p: float | None = None  # keep the smallest set whose probability reaches top_p
    greedy: bool = False  # argmax instead of sampling (seeds are then unused)


@dataclass
class JanusBackbone:
    """A Janus model with its processor (tokenizer + image processor) and where it came from."""

    model: JanusForConditionalGeneration
    processor: JanusProcessor
    source: str
    revision: str | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.processor.tokenizer

    @property
    def vq(self) -> nn.Module:
        """The image tokenizer (`JanusVQVAE`); see `arrag.models.vq` for encode/decode."""
        return self.model.model.vqmodel

    @property
    def num_image_tokens(self) -> int:
        """N, the number of tokens per image (`generate` loops this many times)."""
        return self.model.config.vision_config.num_image_tokens

    @property
    def grid_size(self) -> int:
        """Side of the square token grid (N = grid_size ** 2)."""
        return self.model.config.vq_config.num_patches

    @property
    def boi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)

    def save_pretrained(self, path: str | Path) -> None:
        """Write model (safetensors) and processor so that `load_backbone(path)` restores both."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def load_backbone(
    source: str,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> JanusBackbone:
    """Load model + processor from a hub id (pin `revision` to a commit) or a local directory alike.

    `dtype=None` keeps the checkpoint's dtype (transformers' "auto"); another dtype casts every module but the VQ
    tokenizer, which keeps its checkpoint values (its codebook identifies the patch index, and its tokens and
    decoding do not depend on the precision the transformer runs in). The model is returned in eval mode.
    """
    check_safetensors_folder(source)
    try:
        model = JanusForConditionalGeneration.from_pretrained(source, revision=revision, trust_remote_code=False)
        processor = JanusProcessor.from_pretrained(source, revision=revision, trust_remote_code=False)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load a Janus backbone from {source!r} (revision {revision!r}): it must be a local "
            f"directory written by save_pretrained or a reachable Hugging Face repo like {HUB_JANUS_PRO_1B!r}"
        ) from err
    grid = model.config.vq_config.num_patches
    if model.config.vision_config.num_image_tokens != grid * grid:
        raise ValueError(
            f"{source!r}: vision_config.num_image_tokens={model.config.vision_config.num_image_tokens} "
            f"but the VQ grid is {grid}x{grid}"
        )
    if dtype is not None:
        vq_state = {name: value.clone() for name, value in model.model.vqmodel.state_dict().items()}
        model = model.to(dtype)
        model.model.vqmodel.float().load_state_dict(vq_state)
    if device is not None:
        model = model.to(device)
    return JanusBackbone(model=model.eval(), processor=processor, source=source, revision=revision)


# ----------------------------------------------------------------------------------------------------------
# Tiny configs and a word-level tokenizer (tests now, Shapes-world models later)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer whose vocabulary is the pieces of `words` (words or whole captions).

    Text is lowercased and split on whitespace, and every punctuation character is its own piece. Ids:
    0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, 4 <|User|>, 5 <|Assistant|>, 6 <image_placeholder>,
    7 <begin_of_image>, 8 <end_of_image>, then ":" (the prompt template's) and the distinct pieces in order
    of appearance. BOS is prepended; padding is on the left; unknown pieces map to <unk>.
    """
    specials = [*WORD_SPECIAL_TOKENS.values(), USER_ROLE, ASSISTANT_ROLE, *IMAGE_TOKENS.values()]
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    pieces = [piece for text in [":", *words] for piece, _ in splitter.pre_tokenize_str(text.lower())]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + pieces))}
    bos = WORD_SPECIAL_TOKENS["bos_token"]
    tok = Tokenizer(models.WordLevel(vocab, WORD_SPECIAL_TOKENS["unk_token"]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **WORD_SPECIAL_TOKENS,
        additional_special_tokens=[USER_ROLE, ASSISTANT_ROLE],
        extra_special_tokens=IMAGE_TOKENS,
        padding_side="left",
    )


def tiny_janus_config(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = 64,
    patch_size: int = 8,
    codebook_size: int = 512,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    vq_base_channels: int = 32,
    vq_latent_channels: int = 64,
    vq_embed_dim: int = 8,
    vq_channel_multiplier: tuple[int, ...] | None = None,
    vq_num_res_blocks: int = 1,
) -> JanusConfig:
    """A small but valid JanusConfig: (image_size / patch_size) ** 2 image tokens, `codebook_size` codes.

    Consistency rules (DESIGN "transformers Janus pitfalls"): the token grid comes from the vision config
    (JanusConfig sets vq_config.num_patches = image_size // patch_size); vision_config.num_image_tokens is the
    grid area; the VQ downsamples by patch_size = 2 ** (levels - 1); every GroupNorm(32) width is a multiple
    of 32; vision/VQ projection dims and the image-token embedding dim equal the LM hidden size. The VQ's
    channel multipliers default to Janus's first `levels`; give them (and `vq_num_res_blocks`) to match a trained VQ.
    """
    levels = patch_size.bit_length()
    if patch_size != 2 ** (levels - 1) or levels > len(JANUS_CHANNEL_MULTIPLIER):
        raise ValueError(f"patch_size must be 2, 4, 8 or 16, got {patch_size}")
    if image_size % patch_size or vq_base_channels % 32:
        raise ValueError("image_size must be a multiple of patch_size and vq_base_channels of 32")
    grid = image_size // patch_size
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = JanusVisionConfig(  # the understanding encoder: unused for generation, kept minimal
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2.0,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
        num_image_tokens=grid * grid,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=vq_embed_dim,
        num_embeddings=codebook_size,
        latent_channels=vq_latent_channels,
        base_channels=vq_base_channels,
        channel_multiplier=list(vq_channel_multiplier or JANUS_CHANNEL_MULTIPLIER[:levels]),
        num_res_blocks=vq_num_res_blocks,
        projection_dim=hidden_size,
        image_token_embed_dim=hidden_size,
    )
    return JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, config: JanusConfig) -> JanusProcessor:
    """JanusProcessor for a tiny model: the tokenizer plus an image processor at the model's image size."""
    size = config.vision_config.image_size
    return JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        num_image_tokens=config.vision_config.num_image_tokens,
    )


def build_tiny_backbone(words: list[str], source: str = "tiny", **config_kwargs) -> JanusBackbone:
    """A randomly initialised tiny backbone (seed torch first); `config_kwargs` go to `tiny_janus_config`.

    Its generation config carries `boi_token_id`, so `model.generate(generation_mode="image")` works as on
    the hub checkpoint.
    """
    tokenizer = build_word_tokenizer(words)
    config = tiny_janus_config(tokenizer, **config_kwargs)
    model = JanusForConditionalGeneration(config).eval()
    boi_token_id = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    model.generation_config.generation_kwargs = {"boi_token_id": boi_token_id}
    return JanusBackbone(model=model, processor=build_processor(tokenizer, config), source=source)


# ----------------------------------------------------------------------------------------------------------
# Prompts


def format_prompt(caption: str) -> str:
    """Janus sft format with an empty system prompt; the processor appends <begin_of_image> in image mode."""
    return f"{USER_ROLE}: {caption.strip()}\n\n{ASSISTANT_ROLE}:"


def tokenize_prompts(backbone: JanusBackbone, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (input_ids [B, L], attention_mask [B, L]), left padded, BOS first and BOI last."""
    batch = backbone.processor(
        text=[format_prompt(c) for c in captions], generation_mode="image", padding=True, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def unconditional_ids(backbone: JanusBackbone, input_ids: torch.Tensor) -> torch.Tensor:
    """The CFG / caption-dropout prompt: every token but BOS and BOI replaced by pad (padding stays pad)."""
    tokenizer = backbone.tokenizer
    keep = (input_ids == tokenizer.bos_token_id) | (input_ids == backbone.boi_token_id)
    return input_ids.masked_fill(~keep, tokenizer.pad_token_id)


def derive_seed(global_seed: int, prompt_id: str | int, sample_index: int) -> int:
    """A per-image seed in [0, 2**63) from (global seed, prompt id, sample index), stable across runs."""
    digest = hashlib.sha256(f"{global_seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------------
# Decoder forward with an optional edit after attention


def _run_decoder(
    lm: nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None,
    after_attention: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """The Llama decoder (what `LlamaModel.forward` computes) -> final-normed hidden states [b, s, D].

    `after_attention[i](x, h) -> h` edits layer i: x is the layer's input-normalised hidden states [b, s, D],
    h the hidden states after the attention residual; the layer's MLP block runs on the returned h.
    Layers without an edit run as stock modules.
    """
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
    )
    position_embeddings = lm.rotary_emb(embeds, position_ids=position_ids)
    layer_kwargs = dict(
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
        cache=cache,
        use_cache=cache is not None,
    )
    h = embeds
    for i, layer in enumerate(lm.layers):
        edit = after_attention.get(i)
        if edit is None:
            h = layer(h, **layer_kwargs)
            continue
        x = layer.input_layernorm(h)
        attn, _ = layer.self_attn(hidden_states=x, **layer_kwargs)
        h = edit(x, h + attn)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return lm.norm(h)


def insert_prefix(
    embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert prefix [B, M, D] right after each row's first attended position (BOS) of the left-padded prompt
    embeds [B, L, D] with attention_mask [B, L] -> (embeds [B, L + M, D], attention_mask [B, L + M])."""
    length, m = embeds.shape[1], prefix.shape[1]
    first = attention_mask.long().argmax(-1, keepdim=True)  # [B, 1]: BOS, the first attended position
    pos = torch.arange(length + m, device=embeds.device).unsqueeze(0)  # [1, L + M]
    in_prefix = (pos > first) & (pos <= first + m)  # [B, L + M]
    text_pos = torch.where(pos <= first, pos, pos - m).clamp(0, length - 1)
    prefix_pos = (pos - first - 1).clamp(0, m - 1)
    dim = embeds.shape[-1]
    out = torch.where(in_prefix.unsqueeze(-1), prefix.gather(1, prefix_pos.unsqueeze(-1).expand(-1, -1, dim)),
                      embeds.gather(1, text_pos.unsqueeze(-1).expand(-1, -1, dim)))
    mask = torch.where(in_prefix, 1, attention_mask.gather(1, text_pos)).to(attention_mask.dtype)
    return out, mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers


def filter_top_k_top_p(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Zero all but the top-k / nucleus tokens of probs [B, V] and renormalise; None disables a filter."""
    if top_k is not None and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more probable tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token is always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] (unnormalised is fine) from uniforms [B] in [0, 1) -> [B] long."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------------------
# Decode loop


@torch.no_grad()
def generate_tokens(
    backbone: JanusBackbone,
    prompts: list[str],
    seeds: list[int],
    sampling: SamplingConfig,
    prob_hook: ProbHook | None = None,
    layer_modules: dict[int, nn.Module] | None = None,
    prefix_image_tokens: torch.Tensor | None = None,
    blend_unconditional: bool = False,
) -> torch.Tensor:
    """Image tokens [B, N] (raster order) for captions `prompts` [B] with per-image `seeds` [B].

    See the module docstring for the hook, layer-module and prefix (`prefix_image_tokens` [B, M]) contracts.
    With `blend_unconditional` the layer modules also see and change the unconditional CFG rows (rows B..2B-1
    of their inputs, tokens repeated), which the official FAiD code does not do.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    model = backbone.model
    lm = model.model.language_model
    device = model.device
    batch, num_tokens = len(prompts), backbone.num_image_tokens
    layer_modules = layer_modules or {}

    cond_ids, cond_mask = tokenize_prompts(backbone, prompts)
    input_ids = torch.cat([cond_ids, unconditional_ids(backbone, cond_ids)]).to(device)  # [2B, L]
    attention_mask = cond_mask.repeat(2, 1).to(device)
    embeds = model.get_input_embeddings()(input_ids)  # [2B, L, D]
    if prefix_image_tokens is not None:  # the same prefix for both CFG branches
        prefix = model.prepare_embeddings_for_image_generation(prefix_image_tokens.to(device)).repeat(2, 1, 1)
        embeds, attention_mask = insert_prefix(embeds, attention_mask, prefix)  # [2B, L + M, D]
    position_ids = _positions(attention_mask)
    cache = DynamicCache(config=lm.config)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    uniforms = torch.stack([torch.rand(num_tokens, generator=g) for g in generators]).to(device)  # [B, N]
    tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)

    # FAiD plumbing: per chosen layer, the input-normalised states of image positions [B, N, D]
    rows = 2 * batch if blend_unconditional else batch  # the rows the layer modules see and change
    states = {i: embeds.new_zeros(rows, num_tokens, embeds.shape[-1]) for i in layer_modules}
    step = 0  # read by blend(), advanced by the decode loop

    def blend(layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if step > 0:
            states[layer][:, step - 1] = x[:rows, -1]  # the input this step is image token step-1
        generated = tokens[:, :step].repeat(rows // batch, 1)
        residual = layer_modules[layer](states[layer][:, :step], generated, step)
        if residual is not None:
            h[:rows, -1] += residual.to(h.dtype)  # conditional rows (and unconditional if asked), predicting position
        return h

    after_attention = {i: partial(blend, i) for i in layer_modules}
    prefetch = getattr(prob_hook, "prefetch", None)
    for step in range(num_tokens):
        if prefetch is not None:
            prefetch(tokens[:, :step].clone(), step)
        hidden = _run_decoder(lm, embeds, attention_mask, position_ids, cache, after_attention)
        logits = model.model.generation_head(hidden[:, -1]).float()  # [2B, V]
        cond, uncond = logits[:batch], logits[batch:]
        logits = uncond + sampling.cfg_weight * (cond - uncond)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        probs = filter_top_k_top_p(probs, sampling.top_k, sampling.top_p)
        if prob_hook is not None:
            probs = prob_hook(probs, tokens[:, :step], step)
        if sampling.greedy:
            next_token = probs.argmax(-1)
        else:
            next_token = sample_inverse_cdf(probs, uniforms[:, step])
        tokens[:, step] = next_token

        next_input = next_token.repeat(2).unsqueeze(-1)  # [2B, 1]: the same token for cond and uncond rows
        embeds = model.prepare_embeddings_for_image_generation(next_input)  # [2B, 1, D]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(2 * batch, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return tokens


def forward_teacher_forced(
    backbone: JanusBackbone,
    input_ids: torch.Tensor,
    image_tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_modules: dict[int, nn.Module] | None = None,
    prefix_image_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-token logits [B, N, V] for prompts input_ids [B, L] (left padded, ending in BOI) and the target
    image_tokens [B, N]; row i predicts image token i from the prompt and tokens 0..i-1. Differentiable.

    Layer modules are applied to every row given; `prefix_image_tokens` [B, M] are inserted after BOS (see the
    module docstring for both contracts).
    """
    model = backbone.model
    lm = model.model.language_model
    num_tokens = image_tokens.shape[1]
    layer_modules = layer_modules or {}

    text = model.get_input_embeddings()(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prefix_image_tokens is not None:
        prefix = model.prepare_embeddings_for_image_generation(prefix_image_tokens)
        text, attention_mask = insert_prefix(text, attention_mask, prefix)  # [B, L + M, D]
    prompt_len = text.shape[1]
    image = model.prepare_embeddings_for_image_generation(image_tokens)
    embeds = torch.cat([text, image], dim=1)  # [B, prompt_len + N, D]
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens.shape)], dim=1)

    def blend(layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        residual = layer_modules[layer](x[:, prompt_len:], image_tokens, None)  # [B, N, D]
        if residual is None:
            return h
        return h + F.pad(residual.to(h.dtype), (0, 0, prompt_len - 1, 1))  # rows at positions L-1 .. L+N-2

    after_attention = {i: partial(blend, i) for i in layer_modules}
    hidden = _run_decoder(lm, embeds, attention_mask, _positions(attention_mask), None, after_attention)
    return model.model.generation_head(hidden[:, prompt_len - 1 : prompt_len + num_tokens - 1])
