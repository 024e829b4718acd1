"""The loss value function v(S), evaluated fast from cached residual-stream states.

Players are sublayer positions 0..2L-1 (see surgery.sublayers). Removing a set R of them leaves
everything before min(R) unchanged, and removing a contiguous run p..q-1 leaves the residual stream
at q equal to the stream at p. So one reference pass per calibration batch caches the stream
before every position (and each block's call arguments), and a coalition is evaluated by running
only the blocks from its first kept position after min(R), starting from the cached state at
min(R). The result equals a full forward with R ablated (tests check every family); only the
blocks after the removal are computed. With prefix_cache=False every coalition runs from the
embeddings instead: the baseline the benchmark compares against.

The value is v(S) = -(mean token loss) on the calibration tokens, S = all players minus R.
"""

from __future__ import annotations

import time
from typing import Any

from surgery.ablation import ablated
from surgery.arch import architecture_of, decoder_layers, get_module, unwrap
from surgery.forward import block_output, capture_stream, final_hidden, token_nll
from surgery.scoring.base import ValueFunction
from surgery.sublayers import Sublayer


class ResidualLoss(ValueFunction):
    """v(S) for coalitions given as the set of removed positions; caches every value it computes."""

    def __init__(self, model: Any, batches: list[Any], *, prefix_cache: bool = True, state_device: str | None = None) -> None:
        import torch

        super().__init__()
        self.model = model
        self.base = unwrap(model)
        self.arch = architecture_of(self.base.config)
        self.layers = decoder_layers(self.base, self.arch)
        self.num_players = 2 * len(self.layers)
        self.batches = batches
        self.prefix_cache = prefix_cache
        # The cached streams (2L + 1 per batch) would crowd a GPU holding a large model; they live in
        # host memory by default and only the state a coalition starts from is copied back.
        self.device = next(self.base.parameters()).device
        self.state_device = state_device or "cpu"
        self.tokens = sum(int(b[:, 1:].numel()) for b in batches)
        self._states: list[list[Any]] = []
        self._calls: list[list[tuple[tuple, dict]]] = []
        with torch.no_grad():
            if prefix_cache:
                self._build_cache()
            self._values[frozenset()] = self._compute(frozenset())

    # ------------------------------------------------------------ public

    def values(self, coalitions: list[frozenset[int]], batch: int = 1) -> list[float]:
        """Values of several coalitions. With batch > 1, coalitions that resume at the same position
        with the same later removals (for example the runs that end at the same sublayer) run
        together, up to `batch` at a time: larger matrix multiplies, the same results."""
        import torch

        todo = [c for c in dict.fromkeys(coalitions) if c not in self._values]
        groups: dict[Any, list[frozenset[int]]] = {}
        for coalition in todo:
            key = group_key(coalition) if batch > 1 and self.prefix_cache else None
            groups.setdefault(key if key is not None else coalition, []).append(coalition)
        for members in groups.values():
            for start in range(0, len(members), batch):
                chunk = members[start:start + batch]
                clock = time.perf_counter()
                with torch.no_grad():
                    results = self._compute_group(chunk)
                self.seconds += time.perf_counter() - clock
                self.evaluations += len(chunk)
                self._values.update(zip(chunk, results))
        return [self._values[c] for c in coalitions]

    @property
    def default_batch(self) -> int:
        """Coalitions per batch when --coalition-batch is not given: batching helps on a GPU only."""
        return 4 if self.device.type == "cuda" else 1

    def cost(self, removed: frozenset[int]) -> float:
        return evaluation_cost(removed, len(self.layers)) if self.prefix_cache else len(self.layers) + 1

    def states_at(self, position: int) -> list[Any]:
        """Cached residual stream before `position` (2L = after the last block), one tensor per batch."""
        return [states[position] for states in self._states]

    # ------------------------------------------------------------ internals

    def _build_cache(self) -> None:
        """One reference pass per batch: the stream before every position and each block's call arguments."""
        for ids in self.batches:
            states, calls = capture_stream(self.base, ids, state_device=self.state_device)
            self._states.append([states[p] for p in range(self.num_players + 1)])
            self._calls.append(calls)

    def _compute(self, removed: frozenset[int]) -> float:
        return self._compute_group([removed])[0]

    def _compute_group(self, group: list[frozenset[int]]) -> list[float]:
        """Values of coalitions that resume at the same position with the same later removals:
        their cached input states are stacked and run through the remaining blocks as one batch."""
        totals = [0.0] * len(group)
        for index, ids in enumerate(self.batches):
            hidden = self._hidden(index, ids, group)
            rows = ids.shape[0]
            nll = token_nll(self.base, hidden, ids.repeat(len(group), 1))
            for member in range(len(group)):
                totals[member] += float(nll[member * rows:(member + 1) * rows].sum())
        return [-total / self.tokens for total in totals]

    def _hidden(self, index: int, ids: Any, group: list[frozenset[int]]) -> Any:
        """Final hidden states (after the final norm) of batch `index` for each coalition of `group`,
        stacked along the batch dimension."""
        import torch

        removed = group[0]
        units = [Sublayer.at(p) for p in removed]
        if not self.prefix_cache:
            with ablated(self.base, units):
                return final_hidden(self.base, ids)
        if not removed:
            return get_module(self.base, self.arch.final_norm)(self._states[index][-1].to(self.device))
        resume, skip = resume_point(removed)
        start_layer = resume // 2
        hidden = torch.cat([self._states[index][min(coalition)] for coalition in group]).to(self.device)
        with ablated(self.base, skip):
            for layer_index in range(start_layer, len(self.layers)):
                args, kwargs = self._calls[index][layer_index]
                if len(group) > 1:
                    args, kwargs = _repeat_rows((args, kwargs), len(group), ids.shape[0])
                hidden = block_output(self.layers[layer_index](hidden, *args, **kwargs))
        return get_module(self.base, self.arch.final_norm)(hidden)


def resume_point(removed: frozenset[int]) -> tuple[int, list[Sublayer]]:
    """Where a coalition's computation resumes (the first kept position after its first removed
    run) and what stays ablated from there (including a half-run block's attention)."""
    resume = min(removed)
    while resume in removed:
        resume += 1
    skip = [Sublayer.at(p) for p in removed if p >= resume]
    if resume % 2 == 1:  # resuming at an MLP: this block's attention is already in the cached state
        skip.append(Sublayer(resume // 2, "attn"))
    return resume, skip


def evaluation_cost(removed: frozenset[int], layers: int) -> int:
    """About how long a coalition's evaluation from the cached stream takes, in blocks: those run
    from its resume point on, plus one for the output layer (the full model runs every block)."""
    resume = resume_point(removed)[0] if removed else 0
    return layers - resume // 2 + 1


def group_key(removed: frozenset[int]) -> tuple[int, frozenset[int]] | None:
    """Coalitions with equal keys can run as one batch (None: the full model, or a prefix-less run)."""
    if not removed:
        return None
    resume, _ = resume_point(removed)
    return resume, frozenset(p for p in removed if p >= resume)


def _repeat_rows(value: Any, times: int, rows: int) -> Any:
    """Repeat every tensor whose first dimension is the batch (`rows`) `times` along it."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == rows and rows > 1 else value
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, times, rows) for v in value)
    if isinstance(value, list):
        return [_repeat_rows(v, times, rows) for v in value]
    if isinstance(value, dict):
        return {k: _repeat_rows(v, times, rows) for k, v in value.items()}
    return value
