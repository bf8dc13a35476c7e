"""Show-o backbone and MAGVIT-v2 tokenizer: layouts, strict loading, omni-attention, MaskGIT decoding, extension
points."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import JanusVQVAE

from arrag.models import magvit2
from arrag.models.janus import build_word_tokenizer, derive_seed, tiny_janus_config
from arrag.models.showo import (
    PAD,
    SPECIAL_TOKENS,
    MaskGitSampling,
    ShowoConfig,
    ShowoModel,
    build_tiny_showo,
    final_half,
    forward_teacher_forced,
    generate_tokens,
    load_showo,
    omni_attention_mask,
    scheduled_masks,
    text_ids,
)
from arrag.models.vq import decode_tokens

WORDS = "a the red green blue circle square triangle star left right of above below and two three .".split()
PROMPTS = ["a red circle", "two blue squares left of a green star and a triangle .", "the star"]
SEEDS = [derive_seed(0, i, 0) for i in range(len(PROMPTS))]
STEPS = 6
SAMPLING = MaskGitSampling(guidance_scale=2.0, steps=STEPS)


@pytest.fixture(scope="module")
def backbone():
    """Hidden 64, 2 layers, 4 x 4 grid, 64 codes, 8 caption tokens; weights widened so that logits vary."""
    torch.manual_seed(0)
    bb = build_tiny_showo(
        WORDS,
        codebook_size=64,
        grid_size=4,
        max_text_len=8,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
    )
    with torch.no_grad():
        for p in bb.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return bb


class Recorder:
    """A prob_hook that records (step, grid) and returns `transform(probs)` (identity by default)."""

    def __init__(self, transform=None):
        self.transform = transform or (lambda probs: probs)
        self.calls = []

    def __call__(self, probs, grid, step, steps):
        self.calls.append((step, grid.clone(), probs.clone()))
        return self.transform(probs)


class Projection(nn.Module):
    """Toy FAiD module: a linear map of the image states (or zeros / None), recording its calls."""

    def __init__(self, dim: int, mode: str = "linear"):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.mode = mode
        self.calls = []

    def forward(self, states, grid, step, steps):
        self.calls.append((tuple(states.shape), tuple(grid.shape), step, steps))
        if self.mode == "none":
            return None
        return torch.zeros_like(states) if self.mode == "zeros" else self.proj(states)


# ----------------------------------------------------------------------------------------------------------
# Vocabulary, prompt layout, omni-attention


def test_vocabulary_layout(backbone):
    config = backbone.config
    ids = [backbone.token_id(t) for t in (PAD, *SPECIAL_TOKENS)]
    assert ids == list(range(config.llm_vocab_size, config.llm_vocab_size + 10))
    assert config.image_offset == config.llm_vocab_size + 10
    assert config.mask_token_id == config.vocab_size - 1 == config.image_offset + config.codebook_size
    assert backbone.model.showo.get_input_embeddings().weight.shape[0] == config.vocab_size
    assert backbone.model.showo.lm_head.bias.shape == (config.vocab_size,)


def test_official_config_json_gives_the_default_config():
    official = {
        "_class_name": "Showo",
        "w_clip_vit": False,
        "vocab_size": 58498,
        "llm_vocab_size": 50295,
        "llm_model_path": "microsoft/phi-1_5",
        "codebook_size": 8192,
        "num_vq_tokens": 256,
        "mask_token_id": 58497,
    }
    config = ShowoConfig.from_json(official)
    assert config == ShowoConfig()
    assert (config.image_offset, config.grid_size, config.sequence_length) == (50305, 16, 387)
    with pytest.raises(ValueError, match="mask_token_id"):
        ShowoConfig.from_json({**official, "mask_token_id": 58496})
    with pytest.raises(ValueError, match="w_clip_vit"):
        ShowoConfig.from_json({**official, "w_clip_vit": True})


def test_official_state_dict_names_and_shapes():
    with torch.device("meta"):  # shapes only, no memory
        state = ShowoModel(ShowoConfig()).state_dict()
    assert state["showo.model.embed_tokens.weight"].shape == (58498, 2048)
    assert state["showo.lm_head.weight"].shape == (58498, 2048)
    assert state["showo.model.layers.23.self_attn.q_layernorm.bias"].shape == (64,)
    assert state["showo.model.layers.0.self_attn.dense.weight"].shape == (2048, 2048)
    assert state["showo.model.layers.0.mlp.fc1.weight"].shape == (8192, 2048)
    assert "showo.model.final_layernorm.weight" in state and "showo.model.layers.24.mlp.fc1.bias" not in state


def test_prompt_layout(backbone):
    rows = text_ids(backbone, ["a red circle", PROMPTS[1], ""])
    assert rows.shape == (3, backbone.config.max_text_len + 1)
    tokens = [backbone.tokenizer.convert_ids_to_tokens(r) for r in rows.tolist()]
    assert tokens[0] == [PAD] * 3 + ["<|t2i|>", "<bos>", "a", "red", "circle", "<eos>"]
    assert tokens[1][:3] == ["<|t2i|>", "<bos>", "two"] and tokens[1][-1] == "<eos>"  # truncated, <eos> kept
    assert tokens[2] == [PAD] * 6 + ["<|t2i|>", "<bos>", "<eos>"]


def test_omni_attention_mask_hand_made():
    pad, t2i, bos, word, eos, soi, img, eoi = 0, 1, 2, 3, 4, 5, 6, 7
    ids = torch.tensor([[pad, pad, t2i, bos, word, eos, soi, img, img, eoi]])
    expected = torch.tensor(
        [  # columns: P P t2i bos w eos soi img img eoi
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # pad: causal over padding
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # text: causal, no padding
            [0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # soi .. eoi: everything but padding
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(omni_attention_mask(ids, pad, soi, eoi)[0], expected)


# ----------------------------------------------------------------------------------------------------------
# Loading


def test_save_load_round_trip(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    loaded = load_showo(str(tmp_path))
    assert loaded.config == backbone.config
    assert torch.equal(text_ids(loaded, PROMPTS), text_ids(backbone, PROMPTS))
    grid = torch.randint(0, backbone.config.codebook_size, (len(PROMPTS), backbone.num_image_tokens))
    grid[:, ::3] = backbone.config.mask_token_id
    with torch.no_grad():
        assert torch.equal(
            forward_teacher_forced(loaded, PROMPTS, grid), forward_teacher_forced(backbone, PROMPTS, grid)
        )


def test_strict_loading_names_missing_and_unexpected_keys(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    dropped = "showo.model.layers.1.self_attn.k_layernorm.weight"
    save_file({k: v for k, v in state.items() if k != dropped}, weights)
    with pytest.raises(ValueError, match=r"1 missing: showo\.model\.layers\.1\.self_attn\.k_layernorm\.weight"):
        load_showo(str(tmp_path))
    save_file({**state, "showo.mm_projector.0.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError, match=r"1 unexpected: showo\.mm_projector\.0\.weight"):
        load_showo(str(tmp_path))
    save_file({**state, "showo.lm_head.bias": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"showo\.lm_head\.bias \(3,\)"):
        load_showo(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# MaskGIT decoding and extension points


def test_schedule_unmasks_by_the_cosine_schedule(backbone):
    hook = Recorder()
    tokens = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=hook)
    mask_id, n = backbone.config.mask_token_id, backbone.num_image_tokens
    assert [step for step, _, _ in hook.calls] == list(range(STEPS))
    masked = [int((grid == mask_id).sum(-1).unique().item()) for _, grid, _ in hook.calls]  # the same in each row
    assert masked == [16, 15, 13, 11, 7, 4]  # floor(16 cos(pi/2 * s/6)) in float32 (cos(pi/3) < 0.5)
    for step in range(1, STEPS):
        assert masked[step] == max(1, min(masked[step - 1] - 1, scheduled_masks(n, step - 1, STEPS, "cosine")))
    for (_, before, _), (_, after, _) in zip(hook.calls, hook.calls[1:], strict=False):
        known = before != mask_id
        assert torch.equal(after[known], before[known])  # decided tokens stay
    assert tokens.shape == (len(PROMPTS), n)
    assert ((tokens >= 0) & (tokens < backbone.config.codebook_size)).all()
    last = hook.calls[-1][1]
    assert torch.equal(tokens[last != mask_id], last[last != mask_id])


def test_identity_hook_and_seeds(backbone):
    plain = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING)
    # exact: the same batch and forward, and the hook hands back the very probabilities
    assert torch.equal(generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=Recorder()), plain)
    other = generate_tokens(backbone, PROMPTS, [s + 1 for s in SEEDS], SAMPLING)
    assert not torch.equal(other, plain)


def test_one_hot_hook_decides_the_hooked_steps(backbone):
    token = 7

    def one_hot(probs):
        return torch.nn.functional.one_hot(torch.full(probs.shape[:-1], token), probs.shape[-1]).float()

    hook = Recorder(one_hot)
    tokens = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=hook, hook_steps=final_half(STEPS))
    assert [step for step, _, _ in hook.calls] == [3, 4, 5]
    first_grid = hook.calls[0][1]
    undecided = first_grid == backbone.config.mask_token_id
    assert undecided.any() and (tokens[undecided] == token).all()
    assert torch.equal(tokens[~undecided], first_grid[~undecided])


@pytest.mark.parametrize("mode", ["zeros", "none"])
def test_neutral_layer_modules_change_nothing(backbone, mode):
    plain = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING)
    modules = {0: Projection(64, mode), 1: Projection(64, mode)}
    # exact: the layers with a module run PhiDecoderLayer's operations in its order, then add zeros (or nothing)
    assert torch.equal(generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, layer_modules=modules), plain)
    b, n = len(PROMPTS), backbone.num_image_tokens
    assert modules[1].calls == [((b, n, 64), (b, n), step, STEPS) for step in range(STEPS)]  # conditional rows only


def test_teacher_forced_logits_match_generation(backbone):
    torch.manual_seed(1)
    modules = {1: Projection(64)}
    hook = Recorder()
    plain = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=hook, hook_steps={2})
    tokens = generate_tokens(backbone, PROMPTS, SEEDS, SAMPLING, prob_hook=hook, hook_steps={2}, layer_modules=modules)
    assert not torch.equal(tokens, plain)  # the module acts
    w = SAMPLING.guidance_scale
    for (step, grid, probs), mods in zip(hook.calls, [None, modules], strict=True):
        with torch.no_grad():
            cond = forward_teacher_forced(backbone, PROMPTS, grid, mods, step, STEPS)
            uncond = forward_teacher_forced(backbone, [""] * len(PROMPTS), grid)
        expected = ((1 + w) * cond - w * uncond).softmax(-1)
        # one batch of 2B rows vs two of B, float32: equal to the bit here (1, 2, 4 threads, AVX2), the tolerance
        # allows reordered row products (~1e-7 relative); the module moves these probabilities by 0.16
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


def test_teacher_forced_is_differentiable_through_modules(backbone):
    module = Projection(64)
    grid = torch.full((1, backbone.num_image_tokens), backbone.config.mask_token_id)
    logits = forward_teacher_forced(backbone, PROMPTS[:1], grid, {0: module}, 3, STEPS)
    assert logits.shape == (1, backbone.num_image_tokens, backbone.config.codebook_size)
    logits.logsumexp(-1).sum().backward()
    assert module.proj.weight.grad is not None and module.proj.weight.grad.abs().sum() > 0
    backbone.model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# MAGVIT-v2


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return magvit2.Magvit2(magvit2.tiny_magvit2_config(code_bits=6)).eval()


def test_lfq_code_vectors_and_ids_agree(tokenizer):
    vectors = magvit2.codebook_vectors(tokenizer)
    assert vectors.shape == (64, 6) and vectors.dtype == torch.float32
    assert torch.equal(vectors[1], torch.tensor([-1.0, -1, -1, -1, -1, 1]))  # most significant bit first
    assert torch.equal(vectors[32], torch.tensor([1.0, -1, -1, -1, -1, -1]))
    z = vectors.T.reshape(1, 6, 8, 8)  # each code vector as a latent
    ids = tokenizer.quantize.codes(z)
    assert torch.equal(ids.flatten(), torch.arange(64))
    assert torch.equal(tokenizer.quantize.vectors(ids), z)


def test_magvit2_encode_decode_shapes(tokenizer):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    tokens = magvit2.encode_images(tokenizer, images)
    assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.long
    assert ((tokens >= 0) & (tokens < 64)).all()
    latents = magvit2.encode_latents(tokenizer, images)
    assert latents.shape == (2, 8, 8, 6)
    assert torch.equal(tokenizer.quantize.codes(latents.permute(0, 3, 1, 2)), tokens)
    decoded = magvit2.decode_tokens(tokenizer, tokens)
    assert decoded.shape == (2, 3, 16, 16) and decoded.abs().max() <= 1.0


def test_magvit2_round_trip_and_strict_loading(tokenizer, tmp_path):
    magvit2.save_magvit2(tokenizer, tmp_path)
    loaded = magvit2.load_magvit2(str(tmp_path))
    assert loaded.config == tokenizer.config
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(magvit2.encode_images(loaded, images), magvit2.encode_images(tokenizer, images))
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "quantize.power_vals"}, weights)
    with pytest.raises(ValueError, match=r"missing: quantize\.power_vals"):
        magvit2.load_magvit2(str(tmp_path))
    save_file({**state, "encoder.down.0.attn.0.q.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected: encoder\.down\.0\.attn\.0\.q\.weight"):
        magvit2.load_magvit2(str(tmp_path))
    save_file({**state, "quantize.embedding": -state["quantize.embedding"]}, weights)
    with pytest.raises(ValueError, match="bit convention"):
        magvit2.load_magvit2(str(tmp_path))


def test_magvit2_official_state_dict_names_and_shapes():
    with torch.device("meta"):
        state = magvit2.Magvit2(magvit2.Magvit2Config()).state_dict()
    assert state["encoder.conv_out.weight"].shape == (13, 512, 3, 3)
    assert state["encoder.quant_conv.weight"].shape == (13, 13, 1, 1)
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert state["encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert state["decoder.post_quant_conv.weight"].shape == (13, 13, 1, 1)
    assert state["decoder.up.4.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert state["decoder.up.1.block.3.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["quantize.embedding"].shape == (8192, 13) and state["quantize.power_vals"].shape == (13,)
    assert sum(k.startswith("encoder.down.4.block.") and k.endswith("conv1.weight") for k in state) == 4
    assert not any(".attn." in k for k in state)  # attention only in the middle blocks


def test_shapes_world_pairing_with_the_janus_vq():
    """The default tiny config (512 codes, 8 x 8) decodes through the project's Janus VQ, not MAGVIT-v2."""
    torch.manual_seed(0)
    bb = build_tiny_showo(WORDS, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    assert (bb.config.codebook_size, bb.grid_size) == (512, 8)
    vq = JanusVQVAE(tiny_janus_config(build_word_tokenizer(WORDS)).vq_config).eval()
    tokens = generate_tokens(bb, PROMPTS[:2], SEEDS[:2], MaskGitSampling(steps=3))
    images = decode_tokens(vq, tokens.view(-1, bb.grid_size, bb.grid_size))
    assert images.shape == (2, 3, 64, 64)
