"""Janus backbone: prompt recipe, loading, and the CFG decode loop against transformers' `generate`."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from arrag.models.janus import (
    SamplingConfig,
    build_tiny_backbone,
    build_word_tokenizer,
    derive_seed,
    filter_top_k_top_p,
    forward_teacher_forced,
    generate_tokens,
    load_backbone,
    tiny_janus_config,
    tokenize_prompts,
    unconditional_ids,
)

WORDS = "a the red green blue circle square triangle star left right of above below and two three .".split()
PROMPTS = ["a red circle", "two blue squares left of a green star and a triangle .", "the star"]
GREEDY = SamplingConfig(cfg_weight=3.0, greedy=True)
SAMPLE = SamplingConfig(cfg_weight=3.0, temperature=1.0)
# Two float32 computations of one decode that batch or sum differently (a batch of 3 vs a row alone, ours vs
# transformers' `generate`) differ by at most 4e-5 in the probabilities and in their CDF here, over 1, 2 and 4
# threads and AVX2 (measured; CFG weight 3 multiplies the logits' rounding by 5). TOL = 2e-4 leaves 5x. Tokens
# compared across such computations are compared where every decision is clear of a change of token by 2 TOL.
TOL = 2e-4


@pytest.fixture(scope="module")
def backbone():
    """Hidden 64, 2 layers, 4x4 image tokens, 64 codes; weights widened so that greedy tokens vary."""
    torch.manual_seed(0)
    bb = build_tiny_backbone(
        WORDS,
        image_size=16,
        patch_size=4,
        codebook_size=64,
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


def decode(backbone, prompts, seeds, sampling):
    """`generate_tokens` -> (tokens [B, N], the probabilities each step chose from [B, N, V])."""
    steps = []

    def record(probs, tokens, step):
        steps.append(probs.clone())
        return probs

    tokens = generate_tokens(backbone, prompts, seeds, sampling, prob_hook=record)
    return tokens, torch.stack(steps, dim=1)


def decisions(probs, seeds, sampling):
    """What each decoding step's choice is made on, and how far it is from another token: greedy: the probabilities
    and the top-1 - top-2 gap; sampling: their CDF and the distance from the inverse-CDF target (the step's uniform
    from the row's seed, as `generate_tokens` draws it) to the nearest CDF step."""
    if sampling.greedy:
        top = probs.topk(2, dim=-1).values
        return probs, (top[..., 0] - top[..., 1]).min()
    uniforms = torch.stack([torch.rand(probs.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds])
    cdf = probs.double().cumsum(-1)
    return cdf, (cdf - uniforms.double().unsqueeze(-1) * cdf[..., -1:]).abs().min()


def assert_same_decisions(probs, other_probs, seeds, sampling):
    """Tokens decoded from probs [B, N, V] and from other_probs (the same decode computed otherwise) must agree:
    every decision clear by 2 TOL (data without near-ties) and the two within TOL of each other."""
    values, margin = decisions(probs, seeds, sampling)
    other_values, _ = decisions(other_probs, seeds, sampling)
    assert margin > 2 * TOL, f"a near-tie: decision margin {float(margin):.2e}"
    torch.testing.assert_close(other_values, values, rtol=0, atol=TOL)


class MeanOfPast(nn.Module):
    """Toy FAiD module: residual = proj(mean of the states of image tokens before the predicted one)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.calls = []

    def forward(self, states, tokens, step):
        self.calls.append((tuple(states.shape), tuple(tokens.shape), step))
        if step is not None:  # incremental: [B, step, D] -> [B, D]
            mean = states.mean(1) if step > 0 else states.new_zeros(states.shape[0], states.shape[2])
            return self.proj(mean)
        past_sum = torch.nn.functional.pad(
            states.cumsum(1)[:, :-1], (0, 0, 1, 0)
        )  # teacher forcing: rows < i
        count = torch.arange(states.shape[1], device=states.device).clamp(min=1).unsqueeze(-1)
        return self.proj(past_sum / count)


def test_prompt_follows_official_recipe(backbone):
    ids, mask = tokenize_prompts(backbone, PROMPTS)
    tokens = backbone.tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()])
    assert tokens == [
        "<bos>",
        "<|User|>",
        ":",
        "a",
        "red",
        "circle",
        "<|Assistant|>",
        ":",
        "<begin_of_image>",
    ]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padded
    uncond = unconditional_ids(backbone, ids)
    kept = backbone.tokenizer.convert_ids_to_tokens(uncond[0][uncond[0] != backbone.tokenizer.pad_token_id])
    assert kept == ["<bos>", "<begin_of_image>"]


def test_word_tokenizer_vocabulary_from_captions():
    tokenizer = build_word_tokenizer(["Two red circles, left of a star."])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("two circles , a cat").input_ids)
    assert pieces == ["<bos>", "two", "circles", ",", "a", "<unk>"]
    assert tokenizer.convert_ids_to_tokens(list(range(10))) == [
        "<pad>", "<bos>", "<eos>", "<unk>", "<|User|>", "<|Assistant|>", "<image_placeholder>",
        "<begin_of_image>", "<end_of_image>", ":",
    ]  # fmt: skip


def test_tiny_config_is_consistent():
    tokenizer = build_word_tokenizer(WORDS)
    config = tiny_janus_config(tokenizer)
    assert config.vision_config.num_image_tokens == 64 and config.vq_config.num_patches == 8
    assert list(config.vq_config.channel_multiplier) == [1, 1, 2, 2]
    assert (
        config.vq_config.projection_dim
        == config.vq_config.image_token_embed_dim
        == config.text_config.hidden_size
    )
    assert config.text_config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError):
        tiny_janus_config(tokenizer, patch_size=6)


def test_greedy_matches_transformers_generate(backbone):
    class Record(LogitsProcessor):  # sees the cond and uncond rows' logits before transformers' CFG processor
        def __call__(self, input_ids, scores):
            steps.append(scores.clone())
            return scores

    ids, mask = tokenize_prompts(backbone, PROMPTS)
    steps = []
    reference = backbone.model.generate(
        input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=3.0,
        logits_processor=LogitsProcessorList([Record()]),
    )
    cond, uncond = torch.stack(steps, dim=1).float().chunk(2)
    ours, probs = decode(backbone, PROMPTS, [0, 1, 2], GREEDY)
    assert ours.shape == (3, backbone.num_image_tokens)
    assert_same_decisions(probs, (uncond + 3.0 * (cond - uncond)).softmax(-1), [0, 1, 2], GREEDY)
    assert torch.equal(ours, reference)
    assert len(ours.unique()) > 4  # a non-degenerate model


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLE], ids=["greedy", "sample"])
def test_image_depends_only_on_its_prompt_and_seed(backbone, sampling):
    batch, batch_probs = decode(backbone, PROMPTS, [7, 8, 9], sampling)
    alone, alone_probs = decode(backbone, PROMPTS[1:2], [8], sampling)
    assert_same_decisions(alone_probs, batch_probs[1:2], [8], sampling)
    assert torch.equal(batch[1:2], alone)


def test_seeds_and_filters(backbone):
    first, first_probs = decode(backbone, PROMPTS[:1] * 2, [5, 6], SAMPLE)
    again, again_probs = decode(backbone, PROMPTS[:1], [5], SAMPLE)
    assert_same_decisions(again_probs, first_probs[:1], [5], SAMPLE)
    assert torch.equal(first[:1], again) and not torch.equal(first[0], first[1])
    # the same forward as the greedy run (same batch): top-1 sampling keeps the argmax alone
    top1 = generate_tokens(backbone, PROMPTS, [1, 2, 3], SamplingConfig(cfg_weight=3.0, top_k=1))
    assert torch.equal(top1, generate_tokens(backbone, PROMPTS, [0, 0, 0], GREEDY))


def test_filter_top_k_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # allclose's rtol 1e-5: float32 rounding of these quotients
    assert torch.allclose(filter_top_k_top_p(probs, 2, None), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(filter_top_k_top_p(probs, None, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(filter_top_k_top_p(probs, None, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(filter_top_k_top_p(probs, None, None), probs / probs.sum())


def test_probability_hook(backbone):
    seen = []

    def identity(probs, tokens, step):
        seen.append((tuple(probs.shape), tuple(tokens.shape), step))
        return probs

    plain = generate_tokens(backbone, PROMPTS, [1, 2, 3], SAMPLE)
    assert torch.equal(generate_tokens(backbone, PROMPTS, [1, 2, 3], SAMPLE, prob_hook=identity), plain)
    vocab = backbone.model.config.vq_config.num_embeddings
    assert seen[0] == ((3, vocab), (3, 0), 0) and seen[-1][1:] == ((3, 15), 15)

    def force_token_11(probs, tokens, step):
        return torch.nn.functional.one_hot(torch.full_like(probs[:, 0], 11, dtype=torch.long), vocab).float()

    forced = generate_tokens(backbone, PROMPTS, [1, 2, 3], SAMPLE, prob_hook=force_token_11)
    assert (forced == 11).all()


def test_layer_module_teacher_forcing_equals_decode(backbone):
    torch.manual_seed(1)
    module = MeanOfPast(backbone.model.config.text_config.hidden_size)
    captured = []

    def capture(probs, tokens, step):
        captured.append(probs)
        return probs

    sampling = SamplingConfig(cfg_weight=2.0, greedy=True)
    tokens = generate_tokens(
        backbone, PROMPTS, [0, 1, 2], sampling, prob_hook=capture, layer_modules={1: module}
    )
    n = backbone.num_image_tokens
    assert module.calls[0] == ((3, 0, 64), (3, 0), 0) and module.calls[n - 1] == (
        (3, n - 1, 64),
        (3, n - 1),
        n - 1,
    )
    decode_probs = torch.stack(captured, dim=1)  # [B, N, V]

    ids, mask = tokenize_prompts(backbone, PROMPTS)
    with torch.no_grad():
        cond = forward_teacher_forced(backbone, ids, tokens, mask, layer_modules={1: module})
        uncond = forward_teacher_forced(backbone, unconditional_ids(backbone, ids), tokens, mask)
        vanilla = forward_teacher_forced(backbone, ids, tokens, mask)
    assert module.calls[-1] == ((3, n, 64), (3, n), None)
    teacher_probs = torch.softmax(uncond + 2.0 * (cond - uncond), dim=-1)
    # KV-cached steps vs one teacher-forced forward in float32: measured <= 5e-6 apart, and the same decode batched
    # otherwise moves by up to 3.5e-5 (TOL); 1e-4. A residual one row off moves them by 0.07.
    torch.testing.assert_close(decode_probs, teacher_probs, rtol=0, atol=1e-4)
    assert not torch.allclose(cond, vanilla, atol=1e-3)  # the module does change the logits (by 0.58, measured)


def test_layer_module_returning_none_keeps_vanilla_tokens(backbone):
    class Nothing(nn.Module):
        def forward(self, states, tokens, step):
            return None

    plain = generate_tokens(backbone, PROMPTS, [4, 5, 6], SAMPLE)
    # exact: the edited layer runs LlamaDecoderLayer's operations in its order, on the same batch
    assert torch.equal(
        generate_tokens(backbone, PROMPTS, [4, 5, 6], SAMPLE, layer_modules={0: Nothing()}), plain
    )


def test_teacher_forcing_has_no_future_leakage(backbone):
    torch.manual_seed(2)
    ids, mask = tokenize_prompts(backbone, PROMPTS)
    tokens = torch.randint(0, 64, (3, backbone.num_image_tokens))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    modules = {0: MeanOfPast(64), 1: MeanOfPast(64)}
    with torch.no_grad():
        before = forward_teacher_forced(backbone, ids, tokens, mask, layer_modules=modules)
        after = forward_teacher_forced(backbone, ids, changed, mask, layer_modules=modules)
    assert torch.equal(before[:, :10], after[:, :10])  # rows 0..9 predict tokens 0..9 from tokens < 10
    assert not torch.allclose(before[:, 10:], after[:, 10:])  # a changed input token moves them (by up to 11)


def test_teacher_forcing_is_differentiable(backbone):
    ids, mask = tokenize_prompts(backbone, PROMPTS[:1])
    module = MeanOfPast(64)
    logits = forward_teacher_forced(backbone, ids, torch.zeros(1, 16, dtype=torch.long), mask, {1: module})
    logits.logsumexp(-1).sum().backward()
    assert module.proj.weight.grad is not None and module.proj.weight.grad.abs().sum() > 0
    backbone.model.zero_grad(set_to_none=True)


def test_load_backbone_by_path(backbone, tmp_path):
    backbone.save_pretrained(tmp_path)
    assert "model.generation_head.vision_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded = load_backbone(str(tmp_path))
    assert loaded.source == str(tmp_path) and loaded.num_image_tokens == backbone.num_image_tokens
    assert loaded.tokenizer("a red circle").input_ids == backbone.tokenizer("a red circle").input_ids
    assert torch.equal(
        generate_tokens(loaded, PROMPTS, [1, 2, 3], GREEDY),
        generate_tokens(backbone, PROMPTS, [1, 2, 3], GREEDY),
    )


def test_load_backbone_names_a_missing_source(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_backbone(missing)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "p1", 0) == derive_seed(0, "p1", 0)
    seeds = {derive_seed(g, p, i) for g in (0, 1) for p in ("p1", "p2", 3) for i in range(4)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)
