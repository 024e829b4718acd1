"""Removal without surgery's code: forward hooks on an uncut model that skip whole blocks (their
output is their input) or zero one sublayer's output. Tests compare surgery's physical cuts,
stand-ins and value functions against this."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from surgery.arch import architecture_of, decoder_layers
from surgery.hf_modeling import get_module
from surgery.sublayers import Sublayer, full_blocks


def _zero(module, args, output):
    import torch

    return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)


def _residual(module, args, output):
    """What an attention that adds the stream itself (BLOOM's) returns without its own output."""
    return (args[1], *output[1:])


def _identity(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def skipped(model, units: Iterable[Sublayer]) -> Iterator[None]:
    """`model` runs as if `units` were removed (use_cache=False forwards), by hooks alone."""
    units = set(units)
    arch = architecture_of(model.config)
    layers = decoder_layers(model, arch)
    blocks = set(full_blocks(units))
    hooks = [layers[i].register_forward_hook(_identity, with_kwargs=True) for i in blocks]
    for unit in units:
        if unit.layer not in blocks:
            layer = layers[unit.layer]
            names = [arch.attention_in(layer) if unit.kind == "attn" else arch.mlp, *(m for m, _ in arch.companions(unit.kind))]
            zero = _residual if unit.kind == "attn" and arch.attention_adds_residual else _zero
            hooks += [module.register_forward_hook(zero) for module in (get_module(layer, n, None) for n in names) if module is not None]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def hooked_value(model, batches, removed) -> float:
    """-(mean token loss) over the batches with the sublayer positions `removed` skipped by hooks:
    what the loss value function (surgery.scoring.residual) must give."""
    import torch
    import torch.nn.functional as F

    total = count = 0
    with skipped(model, [Sublayer.at(p) for p in removed]), torch.no_grad():
        for batch in batches:
            logits = model(batch, use_cache=False).logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return -total / count
