import pytest
import torch

from surgery.ablation import ablated
from surgery.arch import ARCHITECTURES, base_model_type, decoder_layers
from surgery.sublayers import parse_sublayers
from surgery.tiny import tiny_model


def ids(batch=2, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, length), generator=generator)


@torch.no_grad()
def test_ablation_restores_the_model_exactly():
    model = tiny_model("llama")
    before_modules = list(model.modules())
    before_params = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    reference = model(ids()).logits
    with ablated(model, parse_sublayers("L0.attn,L1,L3.mlp")):
        ablated_logits = model(ids()).logits
    assert not torch.allclose(ablated_logits, reference)
    assert list(model.modules()) == before_modules
    for name, p in model.named_parameters():
        assert p.data_ptr() == before_params[name][0] and torch.equal(p, before_params[name][1])
    assert torch.equal(model(ids()).logits, reference)


@torch.no_grad()
def test_ablation_restores_after_an_error():
    model = tiny_model("qwen2")
    reference = model(ids()).logits
    with pytest.raises(RuntimeError), ablated(model, parse_sublayers("L2")):
        raise RuntimeError("boom")
    assert torch.equal(model(ids()).logits, reference)


@torch.no_grad()
def test_ablation_equals_zeroing_the_sublayer_output():
    """Removing a sublayer while keeping the residual is the same as making it add zero."""
    model = tiny_model("llama")
    layers = decoder_layers(model)
    hooks = [
        layers[1].self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), *out[1:])),
        layers[2].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)),
    ]
    zeroed = model(ids()).logits
    for hook in hooks:
        hook.remove()
    with ablated(model, parse_sublayers("L1.attn,L2.mlp")):
        assert torch.allclose(model(ids()).logits, zeroed, atol=1e-6)


# transformers' own Jamba (its Mamba scan without mamba_ssm's kernel) differs by up to 2.6e-4 between its
# cached and uncached runs, uncut (tiny models of 3 to 5 blocks); an index error would differ by far more
CACHE_TOLERANCE = {"jamba": 1e-3}


def assert_cache_consistent(model):
    """Chunked prefill and left-padded batched generation match the uncached, unpadded results."""
    sequence = ids(batch=1, length=14, seed=3)
    full = model(sequence, use_cache=False).logits
    family = base_model_type(model.config)
    if family in TOKEN_BY_TOKEN:
        _assert_token_by_token(model, sequence, full)
    else:
        _assert_chunked(model, sequence, full)
    if family not in MASK_IGNORED:
        _assert_padded_batches(model)


# transformers' RecurrentGemma keeps its recurrent state in its modules, returns no cache, and restarts its
# convolution in every multi-token call after a prefill (uncut too): it continues a prefill token by token, as generate() does
TOKEN_BY_TOKEN = {"recurrent_gemma"}
# transformers' xLSTM keeps each block's recurrent state in a cache of its own, by block position (no slot index in
# its modules, no token count), and ignores the attention mask, so a left-padded row is not its prompt alone, uncut
# (test_a_model_that_ignores_the_mask_fails_the_padded_batch_uncut)
STATE_BY_POSITION = {"xlstm"}
MASK_IGNORED = {"xlstm"}


def _assert_token_by_token(model, sequence, full):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = [model(sequence[:, :9], cache=cache, use_cache=True, position_ids=torch.arange(9)[None]).logits]
    for t in range(9, sequence.shape[1]):
        logits.append(model(sequence[:, t:t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[t]])).logits)
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-4)


def _assert_chunked(model, sequence, full):
    first = model(sequence[:, :9], use_cache=True)
    assert base_model_type(model.config) in STATE_BY_POSITION or first.cache.get_seq_length() == 9
    # transformers' Bamba numbers positions from 0 in every call unless given them (its forward never
    # reads the cache for them), so its continuation gets them, as generate() gives them
    positions = {"position_ids": torch.arange(9, 14).unsqueeze(0)} if base_model_type(model.config) == "bamba" else {}
    second = model(sequence[:, 9:], cache=first.cache, use_cache=True, **positions).logits
    tolerance = CACHE_TOLERANCE.get(base_model_type(model.config), 1e-4)
    assert torch.allclose(second, full[:, 9:], atol=tolerance), (second - full[:, 9:]).abs().max()


def _assert_padded_batches(model, alike: bool = True):
    short, long = ids(1, 5, seed=4), ids(1, 11, seed=5)
    pad = 0
    batch = torch.full((2, 11), pad)
    batch[0, 6:] = short[0]
    batch[1] = long[0]
    mask = (torch.arange(11) >= torch.tensor([[6], [0]])).long()
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **settings)[:, 11:]
    alone = [model.generate(x, attention_mask=torch.ones_like(x), **settings)[:, x.shape[1]:] for x in (short, long)]
    assert (torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])) == alike


@pytest.mark.parametrize("family", sorted(MASK_IGNORED))
@torch.no_grad()
def test_a_model_that_ignores_the_mask_fails_the_padded_batch_uncut(family):
    """Why assert_cache_consistent leaves these families' padded batches out: uncut, they fail it."""
    _assert_padded_batches(tiny_model(family, num_layers=4), alike=False)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_a_block_without_its_sublayers_passes_the_stream_through(family, batch):
    """Both stand-ins in place, a block returns its input unchanged, whatever the family's block
    does with its sublayers' outputs (gpt-oss unpacks its FFN's output as a pair)."""
    model = tiny_model(family, num_layers=3)
    layers = decoder_layers(model)
    seen = {}
    hooks = [layers[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0])) for i in (1, 2)]
    model(ids(batch=batch))
    into_l1 = seen[1]
    with ablated(model, parse_sublayers("L1.attn,L1.mlp")):
        model(ids(batch=batch))
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen[2], into_l1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
@torch.no_grad()
def test_skipped_first_attention_keeps_the_kv_cache_consistent(family):
    """The layer-0 trap: a skipped attention that never writes the cache makes it report length 0."""
    model = tiny_model(family)
    with ablated(model, parse_sublayers("L0.attn,L2.attn")):
        assert_cache_consistent(model)
