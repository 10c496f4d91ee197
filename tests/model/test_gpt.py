from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT, KVCache


def build(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_forward_shapes_and_initial_loss(tiny_config):
    model = build(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size))
    targets = torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, tiny_config.block_size, tiny_config.vocab_size)
    assert loss.shape == ()
    # Small initial weights give near-uniform predictions: loss ≈ ln(V).
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.2
    last_logits, no_loss = model(idx)
    assert last_logits.shape == (3, 1, tiny_config.vocab_size) and no_loss is None
    torch.testing.assert_close(last_logits[:, 0], logits[:, -1])


def test_ignored_targets_do_not_count(tiny_config):
    model = build(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, masked_loss = model(idx, targets)
    logits, _ = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, tiny_config.vocab_size), idx[:, :4].reshape(-1))
    torch.testing.assert_close(masked_loss, expected)


def test_output_projection_is_tied_to_token_embedding(tiny_config):
    model = build(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    c, v, t = tiny_config.n_embd, tiny_config.vocab_size, tiny_config.block_size
    assert model.num_parameters() == v * c + t * c + tiny_config.n_layer * 12 * c * c + (2 * tiny_config.n_layer + 1) * c
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - t * c


def test_flops_per_token_counts_weights_and_attention(tiny_config):
    model = build(tiny_config)
    attention = 12 * tiny_config.n_layer * tiny_config.n_embd * tiny_config.block_size
    assert model.flops_per_token() == 6 * model.num_parameters(exclude_embeddings=True) + attention


def test_residual_projections_start_smaller_with_depth():
    config = ModelConfig(n_layer=8, n_head=4, n_embd=128, block_size=16, vocab_size=256, bias=True)
    model = build(config)
    block = model.transformer.h[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0003
    assert abs(block.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0003
    assert torch.count_nonzero(block.mlp.c_fc.bias) == 0
    assert block.ln_1.bias is not None and build(dataclasses.replace(config, bias=False)).transformer.h[0].ln_1.bias is None


def assert_causal(model: GPT) -> None:
    """Changing tokens 10 onwards changes the logits there and none before."""
    config = model.config
    idx = torch.randint(0, config.vocab_size, (1, config.block_size))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % config.vocab_size
    logits, _ = model(idx, idx)
    changed_logits, _ = model(changed, changed)
    torch.testing.assert_close(changed_logits[:, :10], logits[:, :10])
    assert not torch.allclose(changed_logits[:, 10:], logits[:, 10:])


def test_future_tokens_do_not_change_past_logits(tiny_config):
    assert_causal(build(tiny_config))


def test_generate_extends_past_the_context_and_top_k_1_is_greedy(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    new_tokens = 2 * tiny_config.block_size
    generator = torch.Generator().manual_seed(0)
    first = model.generate(prompt, new_tokens, top_k=1, generator=generator)
    second = model.generate(prompt, new_tokens, temperature=0.5, top_k=1, generator=generator)
    assert first.shape == (2, 5 + new_tokens)
    assert torch.equal(first[:, :5], prompt)
    assert torch.equal(first, second)
    # Greedy: every generated token is the argmax given the (cropped) context before it.
    for position in (5, 5 + tiny_config.block_size + 3):
        context = first[:, :position][:, -tiny_config.block_size :]
        logits, _ = model(context)
        assert torch.equal(first[:, position], logits[:, -1].argmax(dim=-1))


def test_generate_samples_only_among_top_k(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (64, 3))
    logits, _ = model(prompt)
    allowed = torch.topk(logits[:, -1], 3).indices  # (64, 3)
    sampled = model.generate(prompt, 1, temperature=10.0, top_k=3, generator=torch.Generator().manual_seed(1))[:, -1]
    assert torch.all((allowed == sampled[:, None]).any(dim=1))
    assert len(torch.unique(sampled)) > 3  # high temperature: not just the argmax everywhere


def test_missing_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(ModelConfig())


def test_sequences_longer_than_the_context_are_refused(tiny_config):
    with pytest.raises(ValueError, match="block_size"):
        build(tiny_config)(torch.zeros((1, tiny_config.block_size + 1), dtype=torch.long))


# --- The modern-recipe switches -------------------------------------------------------------

MODERN = dict(
    position="rotary", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
    zero_init_projections=True, logit_softcap=15.0,
)
SWITCHES = [
    {}, {"position": "rotary"}, {"position": "sinusoidal"}, {"norm": "rmsnorm"}, {"qk_norm": True}, {"mlp": "relu2"}, {"mlp": "swiglu"},
    {"tie_embeddings": False}, {"zero_init_projections": True}, {"logit_softcap": 10.0},
    {"activation_checkpointing": True}, MODERN, {**MODERN, "mlp": "swiglu", "activation_checkpointing": True},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "gpt2")
def test_every_switch_trains_forward_and_backward(tiny_config, switches):
    config = dataclasses.replace(tiny_config, **switches)
    model = build(config).train()
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, config.block_size))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, config.block_size, config.vocab_size)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.2
    loss.backward()
    assert all(parameter.grad is not None and torch.isfinite(parameter.grad).all() for parameter in model.parameters())


def test_default_switches_keep_gpt2_parameter_names(tiny_config):
    names = set(build(tiny_config).state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.ln_f.weight"} <= names
    block = {name.removeprefix("transformer.h.0.") for name in names if name.startswith("transformer.h.0.")}
    assert block == {"ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight"}


def test_rotary_scores_depend_on_relative_position_only():
    from gptflow.model.gpt import apply_rotary, rotary_tables

    T, hs, offset = 8, 16, 5
    cos, sin = rotary_tables(hs, T + offset, theta=10000.0)
    q, k = torch.randn(2, 1, 3, T, hs).unbind(0)  # 2 × (B=1, nh=3, T, hs)
    scores = apply_rotary(q, cos[:T], sin[:T]) @ apply_rotary(k, cos[:T], sin[:T]).mT  # (1, 3, T, T)
    shifted = apply_rotary(q, cos[offset:], sin[offset:]) @ apply_rotary(k, cos[offset:], sin[offset:]).mT
    torch.testing.assert_close(shifted, scores, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores, q @ k.mT, atol=1e-3)  # it does rotate
    # A rotation: norms are unchanged.
    torch.testing.assert_close(apply_rotary(q, cos[:T], sin[:T]).norm(dim=-1), q.norm(dim=-1))


def test_sinusoidal_positions_are_fixed_rotations_of_one_another():
    from gptflow.model.gpt import INIT_STD, sinusoidal_table

    width, offset = 16, 7
    table = sinusoidal_table(64, width).double()
    pairs = table.view(64, width // 2, 2)  # (sin, cos) of one frequency per pair
    assert torch.equal(pairs[0, :, 0], torch.zeros(width // 2, dtype=torch.float64))  # position 0: sin 0, cos 1
    assert torch.allclose(pairs.norm(dim=-1), torch.full((64, width // 2), INIT_STD * math.sqrt(2), dtype=torch.float64),
                          rtol=1e-6)
    # Each pair at position p + offset is the pair at p turned by an angle that depends on the offset
    # alone: one fixed linear map sends every position to the one `offset` later.
    shift = torch.linalg.lstsq(table[:-offset], table[offset:]).solution
    torch.testing.assert_close(table[:-offset] @ shift, table[offset:], atol=1e-6, rtol=0)
    # The slowest frequencies barely turn over the context: they tell far positions apart.
    assert (table[:, 1] - table[0, 1]).abs().max() > (table[:, -1] - table[0, -1]).abs().max()


def test_sinusoidal_model_learns_no_position_parameters_and_tells_positions_apart(tiny_config):
    config = dataclasses.replace(tiny_config, position="sinusoidal")
    model = build(config).eval()
    assert "wpe" not in model.transformer and not any("sinusoidal" in name for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for name, p in build(tiny_config).named_parameters() if "wpe" not in name)
    # The same token at two positions gives two predictions (with no positions and one token they would match).
    idx = torch.full((1, 8), 3)
    logits, _ = model(idx, idx)
    assert not torch.allclose(logits[0, 0], logits[0, 5])


def test_rotary_model_has_no_position_table_and_stays_causal(tiny_config):
    config = dataclasses.replace(tiny_config, **MODERN)
    model = build(config)
    assert "wpe" not in model.transformer
    assert not any("rotary" in name for name in model.state_dict())  # tables are derived, not saved
    # Zero-initialised output projections make every position's prediction the same: train a step first.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(3):
        idx = torch.randint(0, config.vocab_size, (4, config.block_size))
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert_causal(model)


def test_rmsnorm_divides_by_the_root_mean_square_in_the_input_dtype():
    from gptflow.model.gpt import RMSNorm

    eps = 1e-6
    norm = RMSNorm(8, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = 3.0 * torch.randn(4, 8) + 1.0
    expected = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    rms_model = build(ModelConfig(norm="rmsnorm", vocab_size=64))
    assert not any(isinstance(module, torch.nn.LayerNorm) for module in rms_model.modules())


def test_qk_norm_gives_queries_and_keys_unit_rms_per_head(tiny_config):
    model = build(dataclasses.replace(tiny_config, qk_norm=True))
    attention = model.transformer.h[0].attn
    head_size = tiny_config.n_embd // tiny_config.n_head
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (head_size,)
    seen = []
    attention.q_norm.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size)))
    (raw, normalised), = seen
    assert raw.shape == (2, tiny_config.n_head, tiny_config.block_size, head_size)  # per head: (B, nh, T, hs)
    torch.testing.assert_close(normalised.pow(2).mean(dim=-1), torch.ones(raw.shape[:-1]), rtol=1e-3, atol=1e-3)
    assert not isinstance(build(tiny_config).transformer.h[0].attn.q_norm, type(attention.q_norm))


def test_softcap_bounds_logits_and_the_loss_uses_the_capped_logits(tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    maxima = {}
    for cap in (0.0, 5.0):
        config = dataclasses.replace(tiny_config, logit_softcap=cap, dropout=0.0)
        model = build(config)
        with torch.no_grad():
            model.lm_head.weight.mul_(1000.0)  # raw logits in the hundreds
        logits, loss = model(idx, idx)
        maxima[cap] = logits.abs().max().item()
    assert maxima[0.0] > 50.0 and 4.9 < maxima[5.0] <= 5.0
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_zero_init_projections_start_at_zero(tiny_config):
    model = build(dataclasses.replace(tiny_config, zero_init_projections=True, tie_embeddings=False))
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 2 * tiny_config.n_layer and all(torch.count_nonzero(p) == 0 for p in projections)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.weight) > 0
    idx = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    torch.testing.assert_close(model(idx, idx)[1], torch.tensor(math.log(tiny_config.vocab_size)))  # uniform
    tied = build(dataclasses.replace(tiny_config, zero_init_projections=True))
    assert torch.count_nonzero(tied.lm_head.weight) > 0  # it is also the input embedding


def test_untied_head_has_its_own_matrix(tiny_config):
    config = dataclasses.replace(tiny_config, tie_embeddings=False, position="rotary")
    model = build(config)
    assert model.lm_head.weight is not model.transformer.wte.weight
    v, c = config.vocab_size, config.n_embd
    assert model.num_parameters() == build(tiny_config).num_parameters() - config.block_size * c + v * c
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - v * c  # wte is a lookup
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(model.state_dict())


def test_relu2_and_swiglu_keep_the_mlp_parameter_count():
    config = ModelConfig(n_layer=1, n_head=4, n_embd=192, block_size=8, vocab_size=64)
    counts = {mlp: build(dataclasses.replace(config, mlp=mlp)).num_parameters() for mlp in ("gelu", "relu2", "swiglu")}
    assert counts["relu2"] == counts["gelu"]
    assert abs(counts["swiglu"] - counts["gelu"]) / (8 * 192 * 192) < 0.02  # within 2% of the MLP's 8·C²


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config):
    # Random projections, so that every parameter has a non-zero gradient to compare.
    config = dataclasses.replace(tiny_config, **{**MODERN, "zero_init_projections": False})
    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    results = []
    for checkpointed in (False, True):
        model = build(dataclasses.replace(config, activation_checkpointing=checkpointed)).train()
        torch.manual_seed(7)  # the same dropout masks (checkpointing replays the RNG when recomputing)
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_chunked_loss_matches_plain_cross_entropy_and_can_skip_logits(tiny_config, monkeypatch):
    import gptflow.model.gpt as gpt

    monkeypatch.setattr(gpt, "LOSS_CHUNK_TOKENS", 7)  # 3 × 16 targets: several chunks and a ragged last one
    config = dataclasses.replace(tiny_config, logit_softcap=3.0, dropout=0.0)
    model = build(config)
    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    targets = idx.clone()
    targets[1, 5:] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, config.vocab_size), targets.reshape(-1), ignore_index=-1
    )
    torch.testing.assert_close(loss, expected)
    (expected_grad,) = torch.autograd.grad(expected, model.lm_head.weight)
    no_logits, lean_loss = model(idx, targets, return_logits=False)
    assert no_logits is None
    (lean_grad,) = torch.autograd.grad(lean_loss, model.lm_head.weight)
    torch.testing.assert_close(lean_loss, expected)
    torch.testing.assert_close(lean_grad, expected_grad)


def test_lean_loss_keeps_only_the_bf16_logits_for_backward(tiny_config):
    """What autograd saves for the backward pass under bf16 autocast, counted by size: the loss
    keeps the bf16 logits and no float32 copy of them (a plain cross-entropy keeps three)."""
    config = dataclasses.replace(tiny_config, logit_softcap=15.0, vocab_size=1024)
    model = build(config).train()
    idx = torch.randint(0, config.vocab_size, (4, config.block_size))

    def logit_sized_saves(step) -> list[torch.dtype]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()
        return [t.dtype for t in saved if t.numel() >= idx.numel() * config.vocab_size]

    def plain_loss():
        logits = model.lm_head(torch.randn(4, config.block_size, config.n_embd))
        capped = 15.0 * torch.tanh(logits.float() / 15.0)
        torch.nn.functional.cross_entropy(capped.view(-1, config.vocab_size), idx.view(-1))

    assert logit_sized_saves(plain_loss).count(torch.float32) >= 2
    assert logit_sized_saves(lambda: model(idx, idx, return_logits=False)) == [torch.bfloat16]


def test_modern_model_compiles_as_one_graph(tiny_config):
    config = dataclasses.replace(tiny_config, **{**MODERN, "mlp": "swiglu", "activation_checkpointing": True})
    model = build(config).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    _, loss = compiled(idx, idx, return_logits=False)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, idx)[1])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("position", "alibi", "model.position must be one of learned, rotary, sinusoidal"),
        ("norm", "batchnorm", "model.norm must be one of layernorm, rmsnorm"),
        ("mlp", "tanh", "model.mlp must be one of gelu, gelu_tanh, relu2, swiglu"),
        ("logit_softcap", -1.0, "model.logit_softcap must be >= 0"),
    ],
)
def test_bad_switch_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})


def test_rotary_needs_an_even_head_size():
    with pytest.raises(ValueError, match="head size"):
        ModelConfig(n_embd=36, n_head=4, position="rotary")


def test_grouped_query_attention_is_multi_head_attention_with_each_key_value_head_repeated(tiny_config):
    """A model with 2 key/value heads for 4 query heads computes what a multi-head model computes
    whose key/value projections repeat each of those heads for its 2 query heads; its KV cache
    holds 2 heads, and generating with it gives the tokens of generating without."""
    grouped = dataclasses.replace(tiny_config, n_head=4, n_kv_head=2, head_dim=16, dropout=0.0,
                                  **{**MODERN, "zero_init_projections": False})
    full = dataclasses.replace(grouped, n_kv_head=None)
    torch.manual_seed(0)
    gqa, mha = GPT(grouped).eval(), GPT(full).eval()
    state = gqa.state_dict()
    rows = 16  # head_dim
    for layer in range(grouped.n_layer):
        name = f"transformer.h.{layer}.attn.c_attn.weight"
        q, k, v = state[name].split((4 * rows, 2 * rows, 2 * rows))
        repeat = lambda heads: heads.view(2, rows, -1).repeat_interleave(2, dim=0).reshape(4 * rows, -1)  # noqa: E731
        state[name] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, grouped.vocab_size, (2, grouped.block_size))
    torch.testing.assert_close(gqa(idx, idx)[0], mha(idx, idx)[0], rtol=1e-5, atol=1e-5)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape[0] == (4 + 2 * 2) * rows

    prompt = idx[:1, :5]
    cached = gqa.generate(prompt, 8, top_k=1)
    assert torch.equal(cached, gqa.generate(prompt, 8, top_k=1, use_kv_cache=False))
    cache = KVCache(grouped)
    gqa(prompt, kv_cache=cache)
    assert cache.layers[0].keys.shape[1] == 2


@pytest.mark.parametrize(("settings", "message"), [
    ({"n_head": 4, "n_kv_head": 3}, "model.n_kv_head (3) must divide model.n_head (4)"),
    ({"n_head": 3, "n_embd": 32}, "or set model.head_dim"),
    ({"n_kv_head": 0}, "model.n_kv_head must be positive"),
    ({"rope_theta": 0.0}, "model.rope_theta must be positive"),
])
def test_bad_attention_shapes_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**settings)
