"""Linear bridges: repair the residual stream across each cut with a matrix folded into kept weights.

When a contiguous run of sublayers p..q goes, the stream after the kept sublayer k = p - 1 flows
on where the dense model's stream after q used to. A bridge asks that sublayer to carry the
missing change too: its contribution c (the output it adds to the stream) becomes c (I + D), with

    D = argmin sum_t |c_t D - g_t|^2 + ridge |D|^2,   g = s[q+1] - s[k+1]

over the calibration tokens t (s[p] is the dense stream before position p). All runs share one
pass over the dense stream (docs/pruning.md says which variants were tried instead and dropped).
Because c is linear in the sublayer's output projection,
D folds into it exactly (W <- (I + D)^T W, b <- b (I + D)): the checkpoint keeps its architecture and
loads with plain `from_pretrained`. This is the closed-form variant of ReplaceMe (Shopkhoev et al.
2025) and LLM-Streamline (Chen et al. 2024), applied to every run a plan cuts, fitted on the dense
model's stream in one pass over the calibration set, before the cut. An MoE block's output is a
routing-weighted sum of its experts' down projections (plus shared experts), each linear in its
own weights, so D folds into every one of them (`Architecture.moe_outputs`). Families whose
output projection is followed by a norm (`Architecture.output_projections` is empty) are
skipped with a note, never approximated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from surgery.arch import architecture_of, decoder_layers, get_module, unwrap
from surgery.sublayers import Sublayer, contiguous_runs, format_sublayers

_QUANTIZED = "{sublayer}'s output projection is quantized; load the model in full precision to bridge"
RIDGE = 1e-4  # times the mean diagonal of the normal matrix: keeps the solve stable, changes little


@dataclass
class Bridge:
    run: str  # the removed run, e.g. "L12-L17"
    into: str  # the kept sublayer whose output projection carries the bridge
    explained: float = 0.0  # share of the squared gap the bridge folded in closes on the calibration tokens
    cosine_distance: list[float] | None = None  # cosine fit: mean 1 - cos(bridged, dense stream), before and after it


def _cosine_refine(delta: Any, tokens: list[tuple[Any, Any, Any]], steps: int = 300, lr: float = 1e-4) -> tuple[Any, list[float]]:
    """D refined by Adam (full batch) on the mean cosine distance of s[k+1] + c D to s[q+1]."""
    import torch

    c, start, goal = (torch.cat(part) for part in zip(*tokens))
    weights = delta.float().cpu().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=lr)

    def distance() -> Any:
        return (1 - torch.nn.functional.cosine_similarity(start + c @ weights, goal, dim=-1)).mean()

    with torch.enable_grad():
        before = float(distance().detach())
        for _ in range(steps):
            optimizer.zero_grad()
            loss = distance()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = float(distance())
    return weights.detach().double(), [before, after]


@dataclass
class BridgeResult:
    bridges: list[Bridge] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per run that got no bridge, with the reason
    tokens: int = 0

    def describe(self) -> dict[str, Any]:
        return {"bridges": [vars(b) for b in self.bridges], "skipped": self.skipped, "tokens": self.tokens}


def plan_bridges(model: Any, units: Iterable[Sublayer]) -> tuple[list[tuple[Sublayer, list[Sublayer]]], list[str]]:
    """(kept sublayer, removed run) pairs that can be bridged, and why the other runs cannot."""
    from surgery.cut import removed_sublayers

    base = unwrap(model)
    arch = architecture_of(base.config)
    layers = decoder_layers(base, arch)
    absent = set(arch.absent_sublayers(base.config))  # (sublayers a block never had count as gone)
    gone = set(units) | set(removed_sublayers(base)) | absent
    plans, skipped = [], []
    for run in contiguous_runs(gone):
        if not set(run) & set(units):
            continue  # removed by an earlier cut: nothing changes there now
        name = run_name(run, absent)
        if run[0].position == 0:
            skipped.append(f"{name}: no kept sublayer before it")
            continue
        before = Sublayer.at(run[0].position - 1)
        outputs, reason = output_weights(layers[before.layer], arch, before.kind, base.config.hidden_size)
        if reason:
            skipped.append(f"{name}: {reason.format(family=base.config.model_type, sublayer=before)}")
            continue
        plans.append((before, run))
    return plans, skipped


def run_name(run: list[Sublayer], absent: set[Sublayer]) -> str:
    """A removed run as its blocks are named: sublayers a block never had (`absent`) are left out
    of it, except beside the one a single-mixer block holds (Nemotron-H's L3, not L2.mlp,L3)."""
    real = [s for s in run if s not in absent]
    return format_sublayers(real + [s for s in absent if s.layer in {r.layer for r in real}])


@dataclass
class OutputWeight:
    """One weight that writes a sublayer's output: a Linear's [out, in], or experts' stacked
    [experts, out, in] (`output_last`: [experts, in, out], as gpt-oss stores them, DBRX's
    [experts x in, out], or GPT-2's Conv1D [in, out]), with its bias."""

    weight: Any
    bias: Any = None
    output_last: bool = False


def output_weights(layer: Any, arch: Any, kind: str, width: int | None = None) -> tuple[list[OutputWeight], str | None]:
    """The weights a bridge into sublayer `kind` of this block must fold into, or why it cannot
    (`width`: the stream's, which stacked experts that write a latent space lack)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from surgery.hf_modeling import is_linear_block

    if any(k == kind and not isinstance(getattr(layer, norm, None), (torch.nn.Identity, type(None))) for k, norm in arch.output_norms):
        return [], "{sublayer}'s output is normed before the stream; nothing to fold into"
    targets = []
    for path in arch.output_projections(kind, is_linear_block(layer, arch.stand_in_spec())):
        owner_path, _, name = path.rpartition(".")
        try:
            owner = get_module(layer, owner_path)
            found = getattr(owner, name)
        except AttributeError:
            continue  # e.g. the experts of an MoE layout, in one of its dense layers
        if isinstance(found, torch.nn.Identity):
            continue  # a projection the family leaves out in this size (Nemotron-H's latent MoE projections)
        if isinstance(found, torch.nn.Parameter) and found.dim() == 3 and width and width not in found.shape[1:]:
            continue  # experts writing a latent space a projection after them maps to the stream (that one folds)
        if isinstance(found, torch.nn.Linear):
            targets.append(OutputWeight(found.weight, found.bias))
        elif isinstance(found, Conv1D):  # GPT-2's: [in, out]
            targets.append(OutputWeight(found.weight, found.bias, output_last=True))
        elif isinstance(found, torch.nn.Parameter) and (found.dim() == 3 or found.dim() == 2 and arch.experts_output_last):
            # (2-D: DBRX's experts stacked flat, [experts x in, out])
            if getattr(owner, "has_post_expert_norm", False):
                return [], "{sublayer}'s experts normalise their outputs; nothing to fold into"
            bias = getattr(owner, f"{name}_bias", None) if getattr(owner, "has_bias", False) else None
            targets.append(OutputWeight(found, bias, output_last=bool(getattr(owner, "is_transposed", arch.experts_output_last))))
        else:
            return [], _QUANTIZED
    if not targets:
        return [], "{family} has no plain output projection in {sublayer} to fold into"
    if not all(t.weight.dtype.is_floating_point for t in targets):
        return [], _QUANTIZED
    return targets, None


FITS = ("lstsq", "cosine")


def fit_and_fold(model: Any, units: Iterable[Sublayer], batches: list[Any], fit: str = "lstsq") -> BridgeResult:
    """Fit a bridge for every run of `units` on the dense stream and fold it in; call before the cut.

    fit="lstsq": the closed-form least-squares D above. fit="cosine": ReplaceMe's cosine variant,
    D refined from the least-squares one by Adam on the mean cosine distance between the bridged
    stream s[k+1] + c D and the dense stream s[q+1] (the tokens are kept in memory for it)."""
    import torch

    from surgery.forward import capture_stream

    base = unwrap(model)
    arch = architecture_of(base.config)
    layers = decoder_layers(base, arch)
    plans, skipped = plan_bridges(base, units)
    absent = set(arch.absent_sublayers(base.config))
    result = BridgeResult(skipped=skipped)
    if not plans:
        return result
    positions = {p for kept, run in plans for p in (kept.position, kept.position + 1, run[-1].position + 1)}
    targets = [output_weights(layers[kept.layer], arch, kept.kind, base.config.hidden_size)[0] for kept, _ in plans]
    devices = [t[0].weight.device for t in targets]  # each fit runs where its weights live (several GPUs)
    size = base.config.hidden_size
    normal = [torch.zeros(size, size, dtype=torch.float64, device=d) for d in devices]
    cross = [torch.zeros(size, size, dtype=torch.float64, device=d) for d in devices]
    gap_norm = [0.0 for _ in plans]
    kept_tokens: list[list[tuple[Any, Any, Any]]] = [[] for _ in plans]  # (c, s[k+1], s[q+1]) for the cosine fit
    embed_device = base.get_input_embeddings().weight.device
    with torch.no_grad():
        for ids in batches:
            states, _ = capture_stream(base, ids.to(embed_device), positions)
            for index, (kept, run) in enumerate(plans):
                stream = {p: states[p].flatten(0, -2).to(devices[index], torch.float64)
                          for p in (kept.position, kept.position + 1, run[-1].position + 1)}
                contribution = stream[kept.position + 1] - stream[kept.position]
                gap = stream[run[-1].position + 1] - stream[kept.position + 1]
                normal[index] += contribution.T @ contribution
                cross[index] += contribution.T @ gap
                gap_norm[index] += float((gap * gap).sum())
                if fit == "cosine":
                    kept_tokens[index].append((contribution.float().cpu(), stream[kept.position + 1].float().cpu(),
                                               stream[run[-1].position + 1].float().cpu()))
            result.tokens += int(ids.numel())
        for index, (kept, run) in enumerate(plans):
            eye = torch.eye(size, dtype=torch.float64, device=devices[index])
            ridge = RIDGE * float(normal[index].diagonal().mean()) + 1e-12
            solution = torch.linalg.solve(normal[index] + ridge * eye, cross[index])
            bridge = Bridge(run=run_name(run, absent), into=str(kept))
            if fit == "cosine":
                solution, bridge.cosine_distance = _cosine_refine(solution, kept_tokens[index])
                solution = solution.to(normal[index])
            # of the matrix folded in: |c D - g|^2 = |g|^2 - 2 tr(D^T c^T g) + tr(D^T c^T c D)
            residual = gap_norm[index] - 2 * float((solution * cross[index]).sum()) + float((solution * (normal[index] @ solution)).sum())
            bridge.explained = 1 - residual / gap_norm[index] if gap_norm[index] else 0.0
            for target in targets[index]:
                _fold(target, solution.to(devices[index]))
            result.bridges.append(bridge)
    return result


def _fold(target: Any, delta: Any) -> None:
    """Make the output y of `target` (a Linear or an OutputWeight) become y (I + delta), in place."""
    import torch

    if isinstance(target, torch.nn.Linear):
        target = OutputWeight(target.weight, target.bias)
    transform = torch.eye(delta.shape[0], dtype=torch.float64, device=delta.device) + delta
    weight = target.weight.data
    folded = weight.double() @ transform if target.output_last else transform.T @ weight.double()  # broadcast over experts
    weight.copy_(folded.to(weight.dtype))
    if target.bias is not None:
        target.bias.data.copy_((target.bias.data.double() @ transform).to(target.bias.dtype))
