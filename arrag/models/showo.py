"""Show-o backbone: its Phi transformer, vocabulary and prompt layout, omni-attention, and MaskGIT decoding with two
extension points (DAiD's probability hook and FAiD's layer modules).

The transformer is transformers' `PhiForCausalLM` (state-dict prefix ``showo.``, as in the official `Showo`), so the
real checkpoint (`showlab/show-o`) and tiny Shapes-world models share one loading path and one decode loop. The image
tokenizer is not part of the backbone: grids hold codebook ids, and the codebook size and the grid come from
`ShowoConfig`, so Show-o's MAGVIT-v2 (`arrag.models.magvit2`, 8192 codes, 16 x 16) and the project's Janus VQ
(`arrag.models.vq`, e.g. 512 codes, 8 x 8) plug in alike.

Vocabulary (V = llm_vocab_size + num_new_special_tokens + codebook_size + 1):

    [0, llm_vocab_size)             text tokens of the text tokenizer (phi-1_5: 50295)
    llm_vocab_size + 0 .. 9         [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>
    image_offset + c                codebook id c, image_offset = llm_vocab_size + num_new_special_tokens
    V - 1                           the mask token (`mask_token_id`)

Text-to-image sequence (length T + N + 2, T = max_text_len + 1, N = num_vq_tokens):

    [PAD] ... [PAD] <|t2i|> <bos> caption <eos> <|soi|> image_1 .. image_N <|eoi|>

left padded (or truncated, keeping <eos>) to T text tokens; <bos> is prepended when the tokenizer did not. Image
positions hold image_offset + c, or the mask token while undecided. The unconditional (CFG) prompt is the same for
the empty caption: <|t2i|> <bos> <eos>. Position ids are 0 .. L-1 over the whole row, padding included.

Omni-attention (`omni_attention_mask`): text rows attend causally, and rows after the padding do not see the
padding; rows of the image segment (<|soi|> .. <|eoi|>) attend to every position but padding (full attention among
image tokens, and to the whole caption). Text rows never see image tokens, so every step recomputes the sequence.

Decoding (`generate_tokens`), for step s = 0 .. S-1 with grid [B, N] (codebook ids, `mask_token_id` where masked):

    logits over the codebook at the N image positions, conditional rows [0, B) and unconditional rows [B, 2B)
    -> CFG (float32): (1 + w) * cond - w * uncond  (= uncond + (1 + w)(cond - uncond); skipped when w = 0)
    -> softmax -> prob_hook (at the steps asked for) -> rows renormalised
    -> sample a token at every position (temperature 1) and keep the known ones
    -> r = (s + 1) / S; m = max(1, min(#masked - 1, floor(N * schedule(r))))
    -> t = t * (1 - r)   (compounding over steps, as the official loop reassigns its temperature)
    -> confidence = log p(sampled) + t * Gumbel, +inf at known positions; re-mask the m least confident
The result is the last step's sampled grid: every position decided, no mask token.

Extension points (each costs nothing when absent):

* ``prob_hook(probs [B, N, C] float32, grid [B, N] long, step, steps) -> probs [B, N, C]``: called after CFG and
  softmax, before sampling, at the steps in `hook_steps` (every step when None; DAiD uses `final_half(steps)`,
  Appendix B.2). ``grid`` is the state before this step (read-only). The result must be non-negative with positive
  row sums; it is renormalised and used both to sample and as the re-masking confidence.
* ``layer_modules: {layer index: nn.Module}`` (FAiD): at every step each module is called as
  ``module(states [B, N, D], grid [B, N], step, steps)`` with that layer's input-normalised hidden states
  (`input_layernorm` output) at the N image positions of the conditional rows; it returns a residual [B, N, D] (or
  None) that is added to those positions' hidden states after the layer's attention block. Phi runs attention and
  MLP in parallel on the same normalised input, so this is the layer's output; unconditional rows are unchanged.
  `forward_teacher_forced` calls the same modules on every row it is given, with the step / steps passed to it.

Per-image randomness: row b draws all its uniforms (S x N for sampling, S x N for the Gumbel noise) from
``torch.Generator().manual_seed(seeds[b])`` before decoding (seeds from `arrag.models.janus.derive_seed`), and
samples by inverse CDF, so an image's tokens depend only on its prompt, its seed and the settings, not on the rest
of the batch (up to floating-point differences of batched products).

Facts checked (official Show-o code, github.com/showlab/Show-o at 45a5a2d, read for facts, not copied):
- models/modeling_showo.py: `Showo.showo = PhiForCausalLM(config)` then `resize_token_embeddings(vocab_size)` (input
  embedding and the biased lm_head); `mask_token_id = vocab_size - 1`; `mm_projector` only with `w_clip_vit`.
  `t2i_generate`: logits at positions -(N+1):-1 restricted to ids [llm_vocab_size + num_new_special_tokens, V - 1);
  CFG ``(1 + guidance_scale) * cond - guidance_scale * uncond`` with the unconditional prompt's first
  max_seq_length + 1 tokens followed by the current image tokens; `torch.multinomial` on softmax(logits) (no
  temperature); ratio = (step + 1) / timesteps; mask_len = floor(N * schedule(ratio)) clamped to
  [1, #unknown - 1]; ``temperature = temperature * (1.0 - ratio)`` inside the loop; known tokens get confidence
  finfo.max (we use +inf: they are never re-masked either way); returns the last `sampled_ids`.
- models/phi.py: `PhiForCausalLM.__init__` sets ``config.qk_layernorm = True`` (LayerNorms on per-head queries and
  keys); the 4-D mask is added to the scores as given; position ids default to arange(L); parallel attention + MLP
  from one `input_layernorm`; lm_head has a bias.
- models/sampling.py: cosine ``cos(r * pi / 2)``, linear ``1 - r`` and ``pow<p>`` ``1 - r ** p`` (both clamped to
  [1e-6, 1]); Gumbel noise ``-log(-log(u))`` with logs clamped at 1e-20; `mask_by_random_topk`: confidence
  ``log p + temperature * gumbel``, mask those below the mask_len-th smallest.
- training/prompting_utils.py: `UniversalPrompting` adds '[PAD]' as pad token, then the nine special tokens in the
  order above; `t2i_gen_prompt` layout and truncation as above; `create_attention_mask_predict_next(...,
  rm_pad_in_image=True)` is the omni-attention mask above (written here for left-padded rows, one image segment).
- inference_t2i.py: unconditional caption ''; image ids = code + len(text tokenizer); schedule
  `config.training.mask_schedule` default cosine; temperature `generation_temperature` default 1.0.
- configs/showo_demo.yaml: vocab_size 58498, llm_vocab_size 50295, num_new_special_tokens 10, codebook_size 8192,
  num_vq_tokens 256, max_seq_length 128, llm_model_path microsoft/phi-1_5. README.md (t2i command): guidance_scale 5,
  generation_timesteps 50.
- microsoft/phi-1_5 config.json (a public copy): hidden 2048, 24 layers, 32 heads, FFN 8192, gelu_new, partial
  rotary 0.5, rope_theta 10000, layer_norm_eps 1e-5, untied embeddings, 2048 positions (the official `Showo`
  builds its Phi from this config, so the checkpoint's config.json need not repeat it).
Not verified without the checkpoint: the weight file names and config.json keys of `showlab/show-o` (loading
accepts the names diffusers' ModelMixin writes and checks vocab_size / mask_token_id when present); that the
phi-1_5 tokenizer has 50295 tokens and adds no <bos> (the loader checks the count). Numerics differ slightly from
the official code: it computes attention scores in float32 and caches rotary tables in the default dtype, while
transformers' attention runs in the model dtype; and it draws from one generator per batch with multinomial
sampling, where we use one generator per image and inverse-CDF sampling (same distributions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM, PreTrainedTokenizerBase

from arrag.models.checkpoint import load_strict, read_checkpoint, write_checkpoint
from arrag.models.janus import build_word_tokenizer, sample_inverse_cdf

HUB_SHOWO = "showlab/show-o"
PHI_1_5 = "microsoft/phi-1_5"
PAD = "[PAD]"
SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")

ProbHook = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class ShowoConfig:
    """Vocabulary, image and Phi sizes. The defaults are `showlab/show-o` (256 x 256 images, MAGVIT-v2)."""

    llm_vocab_size: int = 50295
    num_new_special_tokens: int = 10
    codebook_size: int = 8192
    num_vq_tokens: int = 256  # N, a square grid
    max_text_len: int = 128  # the official `max_seq_length`: caption tokens; the text part has one more (<|t2i|>)
    llm_model_path: str = PHI_1_5  # where the text tokenizer comes from when the checkpoint has none
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    hidden_act: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def vocab_size(self) -> int:
        return self.llm_vocab_size + self.num_new_special_tokens + self.codebook_size + 1

    @property
    def image_offset(self) -> int:
        """Vocabulary id of codebook id 0."""
        return self.llm_vocab_size + self.num_new_special_tokens

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def text_len(self) -> int:
        """T, the length of the text part: <|t2i|> + max_text_len tokens."""
        return self.max_text_len + 1

    @property
    def sequence_length(self) -> int:
        return self.text_len + self.num_vq_tokens + 2

    @property
    def grid_size(self) -> int:
        side = math.isqrt(self.num_vq_tokens)
        if side * side != self.num_vq_tokens:
            raise ValueError(f"num_vq_tokens={self.num_vq_tokens} is not a square grid")
        return side

    def phi_config(self) -> PhiConfig:
        """The Phi config of the official model: phi-1_5's with Show-o's vocabulary and qk LayerNorms."""
        return PhiConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            qk_layernorm=True,
            tie_word_embeddings=False,
        )

    def to_json(self) -> dict:
        """config.json content: the official keys (`_class_name`, vocab_size, mask_token_id, ...) plus ours."""
        return {
            "_class_name": "Showo",
            "w_clip_vit": False,
            "vocab_size": self.vocab_size,
            "mask_token_id": self.mask_token_id,
            **asdict(self),
        }

    @classmethod
    def from_json(cls, data: dict) -> ShowoConfig:
        """Read a config.json written by `to_json` or by the official code (whose Phi sizes are phi-1_5's)."""
        if data.get("_class_name", "Showo") != "Showo":
            raise ValueError(f"config.json describes {data['_class_name']!r}, not Showo")
        if data.get("w_clip_vit"):
            raise ValueError("Show-o with CLIP-ViT features (w_clip_vit) is not supported: text-to-image only")
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        if "hidden_size" not in data and config.llm_model_path != PHI_1_5:
            raise ValueError(f"config.json gives no Phi sizes and its LLM is {config.llm_model_path!r}, not {PHI_1_5}")
        for key in ("vocab_size", "mask_token_id"):
            if key in data and data[key] != getattr(config, key):
                raise ValueError(
                    f"config.json: {key}={data[key]} but the vocabulary layout gives {getattr(config, key)}"
                )
        return config


class ShowoModel(nn.Module):
    """The transformer: `showo` is a `PhiForCausalLM` over the Show-o vocabulary (official state-dict names)."""

    def __init__(self, config: ShowoConfig):
        super().__init__()
        if config.sequence_length > config.max_position_embeddings:
            raise ValueError(f"sequences of {config.sequence_length} tokens exceed {config.max_position_embeddings}")
        self.config = config
        self.showo = PhiForCausalLM(config.phi_config())

    @property
    def device(self) -> torch.device:
        return self.showo.device


@dataclass
class ShowoBackbone:
    """A Show-o transformer with its text tokenizer (Show-o tokens added) and where it came from."""

    model: ShowoModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    revision: str | None = None

    @property
    def config(self) -> ShowoConfig:
        return self.model.config

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_vq_tokens

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def save_pretrained(self, path: str | Path) -> None:
        """Write model.safetensors, config.json and the tokenizer so that `load_showo(path)` restores all."""
        write_checkpoint(self.model, self.config.to_json(), path)
        self.tokenizer.save_pretrained(path)


def add_showo_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add '[PAD]' (as pad token) and the nine Show-o special tokens, in the official order (idempotent)."""
    tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.add_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: ShowoConfig) -> None:
    """The tokenizer must fill exactly the text and special-token ranges of the vocabulary."""
    if len(tokenizer) != config.image_offset:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens with the Show-o tokens added, but the vocabulary layout "
            f"expects {config.llm_vocab_size} + {config.num_new_special_tokens}"
        )


def load_showo(
    source: str = HUB_SHOWO,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer_source: str | None = None,
    tokenizer_revision: str | None = None,
) -> ShowoBackbone:
    """Load a Show-o backbone from a hub id (pin `revision` to a commit) or a local directory, strictly.

    The text tokenizer comes from `tokenizer_source` if given, else from `source` when it is a local directory
    holding one (`save_pretrained` writes it), else from `config.llm_model_path` (the official checkpoint has none:
    Show-o uses microsoft/phi-1_5's). `dtype=None` keeps the checkpoint's floating dtype. Returned in eval mode.
    """
    data, state = read_checkpoint(source, revision)
    config = ShowoConfig.from_json(data)
    model = ShowoModel(config)
    load_strict(model, state, source)
    if dtype is None:
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    if tokenizer_source is None and (Path(source) / "tokenizer_config.json").is_file():
        tokenizer_source = source
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source or config.llm_model_path,
        revision=tokenizer_revision,
        padding_side="left",
        trust_remote_code=False,
    )
    check_tokenizer(add_showo_tokens(tokenizer), config)
    return ShowoBackbone(model.to(device=device, dtype=dtype).eval(), tokenizer, source, revision)


def tiny_showo_config(
    llm_vocab_size: int,
    codebook_size: int = 512,
    grid_size: int = 8,
    max_text_len: int = 24,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
) -> ShowoConfig:
    """A small Show-o config (defaults: the Shapes world's Janus VQ, 512 codes on an 8 x 8 grid)."""
    config = ShowoConfig(
        llm_vocab_size=llm_vocab_size,
        codebook_size=codebook_size,
        num_vq_tokens=grid_size * grid_size,
        max_text_len=max_text_len,
        llm_model_path="",
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    config.max_position_embeddings = config.sequence_length
    return config


def build_tiny_showo(words: list[str], source: str = "tiny", **config_kwargs) -> ShowoBackbone:
    """A randomly initialised tiny backbone (seed torch first) with a word-level tokenizer over `words`
    (`arrag.models.janus.build_word_tokenizer`); `config_kwargs` go to `tiny_showo_config`."""
    tokenizer = build_word_tokenizer(words)
    config = tiny_showo_config(len(tokenizer), **config_kwargs)
    check_tokenizer(add_showo_tokens(tokenizer), config)
    return ShowoBackbone(ShowoModel(config).eval(), tokenizer, source)


# ----------------------------------------------------------------------------------------------------------
# Prompt layout and omni-attention


def text_ids(backbone: ShowoBackbone, captions: list[str]) -> torch.Tensor:
    """The text part [B, T] of the t2i sequence: [PAD]* <|t2i|> <bos> caption <eos> (see the module docstring)."""
    tok, length = backbone.tokenizer, backbone.config.text_len
    pad, t2i = backbone.token_id(PAD), backbone.token_id("<|t2i|>")
    rows = []
    for ids in tok(list(captions))["input_ids"]:
        if not ids or ids[0] != tok.bos_token_id:
            ids = [tok.bos_token_id, *ids]
        ids = [t2i, *ids, tok.eos_token_id]
        if len(ids) > length:
            ids = [*ids[: length - 1], tok.eos_token_id]
        rows.append([pad] * (length - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long)


def t2i_input_ids(backbone: ShowoBackbone, text: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Full sequences [B, T + N + 2] from text parts [B, T] and grids [B, N] (codebook ids or the mask id)."""
    config = backbone.config
    image = torch.where(grid == config.mask_token_id, grid, grid + config.image_offset)
    soi = text.new_full((len(text), 1), backbone.token_id("<|soi|>"))
    eoi = text.new_full((len(text), 1), backbone.token_id("<|eoi|>"))
    return torch.cat([text, soi, image.to(text.device), eoi], dim=1)


def omni_attention_mask(input_ids: torch.Tensor, pad_id: int, soi_id: int, eoi_id: int) -> torch.Tensor:
    """Which positions each position may attend to, [B, L, L] bool (row = query), for left-padded sequences with one
    image segment: text rows causal without the padding (padding rows see earlier padding), image-segment rows
    (<|soi|> .. <|eoi|>) everything but padding."""
    length = input_ids.shape[1]
    pad = input_ids == pad_id
    opened = torch.cumsum(input_ids == soi_id, dim=1)
    closed = torch.cumsum(input_ids == eoi_id, dim=1)
    in_image = (opened > closed) | (input_ids == soi_id) | (input_ids == eoi_id)  # [B, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    text_rows = causal & ~(pad.unsqueeze(1) & ~pad.unsqueeze(2))  # a non-pad row does not see pad columns
    image_rows = ~pad.unsqueeze(1)
    return torch.where(in_image.unsqueeze(2), image_rows, text_rows)


def attention_bias(backbone: ShowoBackbone, input_ids: torch.Tensor) -> torch.Tensor:
    """The omni-attention mask as an additive bias [B, 1, L, L] in the model dtype (0 or the dtype's minimum)."""
    allowed = omni_attention_mask(
        input_ids, backbone.token_id(PAD), backbone.token_id("<|soi|>"), backbone.token_id("<|eoi|>")
    )
    dtype = backbone.model.showo.dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# Transformer forward with optional FAiD modules


def image_logits(
    backbone: ShowoBackbone,
    input_ids: torch.Tensor,
    bias: torch.Tensor,
    grid: torch.Tensor,
    layer_modules: dict[int, nn.Module],
    step: int | None,
    steps: int | None,
) -> torch.Tensor:
    """Codebook logits [R, N, C] at the image positions of sequences input_ids [R, L] under bias [R, 1, L, L].

    Layer modules see and change rows [0, B) of the batch, B = len(grid) (the conditional rows when R = 2B).
    """
    config = backbone.config
    phi = backbone.model.showo
    lm = phi.model
    start, stop = config.text_len + 1, config.text_len + 1 + config.num_vq_tokens  # image positions
    rows, length = grid.shape[0], input_ids.shape[1]
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
    h = lm.embed_dropout(lm.embed_tokens(input_ids))
    position_embeddings = lm.rotary_emb(h, position_ids=position_ids)
    for i, layer in enumerate(lm.layers):
        module = layer_modules.get(i)
        if module is None:
            h = layer(h, attention_mask=bias, position_ids=position_ids, position_embeddings=position_embeddings)
            continue
        x = layer.input_layernorm(h)
        attn, _ = layer.self_attn(hidden_states=x, attention_mask=bias, position_embeddings=position_embeddings)
        h = layer.resid_dropout(attn) + layer.resid_dropout(layer.mlp(x)) + h  # PhiDecoderLayer's sum
        residual = module(x[:rows, start:stop], grid, step, steps)
        if residual is not None:
            h = h + F.pad(residual.to(h.dtype), (0, 0, start, length - stop, 0, h.shape[0] - rows))
    h = lm.final_layernorm(h[:, start:stop])
    codebook = slice(config.image_offset, config.image_offset + config.codebook_size)
    return F.linear(h, phi.lm_head.weight[codebook], phi.lm_head.bias[codebook])


def forward_teacher_forced(
    backbone: ShowoBackbone,
    captions: list[str],
    grid: torch.Tensor,
    layer_modules: dict[int, nn.Module] | None = None,
    step: int | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Codebook logits [B, N, C] for captions [B] and partially masked grids [B, N] (codebook ids, the mask id where
    masked), as one decoding step sees them. Differentiable. Layer modules run on every row and get `step` /
    `steps` as given; an empty caption is the unconditional prompt (the official caption dropout)."""
    device = backbone.model.device
    input_ids = t2i_input_ids(backbone, text_ids(backbone, captions).to(device), grid.to(device))
    bias = attention_bias(backbone, input_ids)
    return image_logits(backbone, input_ids, bias, grid.to(device), layer_modules or {}, step, steps)


# ----------------------------------------------------------------------------------------------------------
# MaskGIT decoding


@dataclass
class MaskGitSampling:
    """Show-o decoding settings. Defaults: the official README's text-to-image command (guidance 5, 50 steps),
    temperature 1 (`generation_temperature`), cosine schedule."""

    guidance_scale: float = 5.0
    steps: int = 50
    temperature: float = 1.0  # scale of the re-masking Gumbel noise; tokens are always sampled at temperature 1
    schedule: str = "cosine"  # "cosine", "linear" or "pow<p>"


def mask_ratio(schedule: str, ratio: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens still masked after decoding fraction `ratio` of the steps."""
    if schedule == "cosine":
        return torch.cos(ratio * math.pi * 0.5)
    if schedule == "linear":
        return (1 - ratio).clamp(1e-6, 1.0)
    if schedule.startswith("pow"):
        return (1 - ratio ** float(schedule[3:])).clamp(1e-6, 1.0)
    raise ValueError(f"unknown mask schedule {schedule!r} (cosine, linear or pow<p>)")


def scheduled_masks(num_tokens: int, step: int, steps: int, schedule: str) -> int:
    """floor(N * schedule((step + 1) / steps)), in float32 as the official loop computes it (before clamping)."""
    ratio = torch.tensor((step + 1) / steps, dtype=torch.float32)
    return int(torch.floor(num_tokens * mask_ratio(schedule, ratio)))


def final_half(steps: int) -> range:
    """The decoding steps at which AR-RAG retrieves on Show-o (the final half, Appendix B.2)."""
    return range(steps // 2, steps)


def gumbel(uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from uniforms in [0, 1), logs clamped at 1e-20 as in the official code."""
    return -torch.log((-torch.log(uniforms.clamp(min=1e-20))).clamp(min=1e-20))


@torch.no_grad()
def generate_tokens(
    backbone: ShowoBackbone,
    prompts: list[str],
    seeds: list[int],
    sampling: MaskGitSampling,
    prob_hook: ProbHook | None = None,
    hook_steps: Collection[int] | None = None,
    layer_modules: dict[int, nn.Module] | None = None,
) -> torch.Tensor:
    """Image tokens [B, N] (raster order, codebook ids) for captions `prompts` [B] with per-image `seeds` [B].

    See the module docstring for the decoding rule and the `prob_hook` (called at `hook_steps`, every step when
    None) and `layer_modules` contracts.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    config, device = backbone.config, backbone.model.device
    batch, num_tokens, steps = len(prompts), config.num_vq_tokens, sampling.steps
    mask_id, weight = config.mask_token_id, sampling.guidance_scale
    layer_modules = layer_modules or {}

    captions = list(prompts) + [""] * batch if weight > 0 else list(prompts)  # conditional rows, then unconditional
    text = text_ids(backbone, captions).to(device)  # [R, T]
    copies = len(captions) // batch
    grid = torch.full((batch, num_tokens), mask_id, dtype=torch.long, device=device)
    bias = attention_bias(backbone, t2i_input_ids(backbone, text, grid.repeat(copies, 1)))  # the same every step
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    uniforms = torch.stack([torch.rand(steps, 2, num_tokens, generator=g) for g in generators]).to(device)

    temperature = sampling.temperature
    for step in range(steps):
        input_ids = t2i_input_ids(backbone, text, grid.repeat(copies, 1))
        logits = image_logits(backbone, input_ids, bias, grid, layer_modules, step, steps).float()
        if weight > 0:
            cond, uncond = logits.chunk(2)
            logits = (1 + weight) * cond - weight * uncond
        probs = logits.softmax(-1)  # [B, N, C]
        if prob_hook is not None and (hook_steps is None or step in hook_steps):
            probs = prob_hook(probs, grid, step, steps)
        probs = probs / probs.sum(-1, keepdim=True)

        sampled = sample_inverse_cdf(probs.flatten(0, 1), uniforms[:, step, 0].flatten()).view(batch, num_tokens)
        unknown = grid == mask_id
        sampled = torch.where(unknown, sampled, grid)
        ratio = (step + 1) / steps
        scheduled = scheduled_masks(num_tokens, step, steps, sampling.schedule)
        num_masked = (unknown.sum(-1, keepdim=True) - 1).clamp(max=scheduled).clamp(min=1)  # [B, 1]
        temperature = temperature * (1.0 - ratio)
        confidence = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).clamp(min=1e-20).log()
        confidence = confidence + temperature * gumbel(uniforms[:, step, 1])
        confidence = confidence.masked_fill(~unknown, math.inf)
        cutoff = confidence.sort(-1).values.gather(-1, num_masked)
        grid = torch.where(confidence < cutoff, mask_id, sampled)
    return sampled
