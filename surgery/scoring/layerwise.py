"""The loss value function of surgery.scoring.residual, for a model that does not fit in memory: the
checkpoint is read one decoder block at a time (surgery.layerwise) and every pass runs layer-major,
so each block is read once per pass whatever the number of batches and coalitions.

The reference pass caches the residual stream before every sublayer position (on CPU, or, when
it would take more than half the free memory, in an unnamed file in `spill_dir` that vanishes
with the process), exactly as the in-memory prefix cache does; a group of coalitions
then starts each from the cached state at its first removal and runs the blocks after it, the block
read once for the whole group; the output layer is read once per group too, a slice of the
vocabulary at a time, with a running log-sum-exp. Values equal the in-memory ones up to float
rounding (tests/test_layerwise.py states the tolerance).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgery.scoring.base import ValueFunction
from surgery.scoring.residual import resume_point
from surgery.sublayers import Sublayer

GROUP = 64  # coalitions run through the blocks together (their states live on CPU meanwhile), at most


class LayerwiseResidualLoss(ValueFunction):
    """v(S) = -(mean token loss) on the calibration batches, for a LayerwiseModel."""

    def __init__(self, model: Any, batches: list[Any], *, spill_dir: Path | None = None) -> None:
        from surgery.memory import available_memory

        super().__init__()
        self.model = model
        self.base = model  # what the analysis reads the vocabulary size from
        self.device = model.device
        self.batches = batches
        self.num_players = 2 * model.num_layers
        self.tokens = sum(int(b[:, 1:].numel()) for b in batches)
        self._streams = [model.embed(ids) for ids in batches]  # each batch's block arguments (rotary embeddings, masks)
        one = sum(s.hidden.numel() * s.hidden.element_size() for s in self._streams)  # one position, every batch
        free = available_memory("cpu")
        spill = spill_dir if spill_dir is not None and one * (self.num_players + 1) > free // 2 else None
        self._states = _States([s.hidden for s in self._streams], self.num_players + 1, spill)
        self.default_batch = max(1, min(GROUP, free // 4 // one))  # a group's states take at most a quarter
        self._reference_pass()

    def values(self, coalitions: list[frozenset[int]], batch: int = 1) -> list[float]:
        todo = [c for c in dict.fromkeys(coalitions) if c not in self._values]
        for start in range(0, len(todo), max(batch, 1)):
            group = todo[start:start + max(batch, 1)]
            clock = time.perf_counter()
            self._values.update(zip(group, self._group_values(group)))
            self.seconds += time.perf_counter() - clock
            self.evaluations += len(group)
        return [self._values[c] for c in coalitions]

    def states_at(self, position: int) -> list[Any]:
        return [self._states.get(b, position) for b in range(len(self.batches))]

    # ------------------------------------------------------------ passes

    def _reference_pass(self) -> None:
        """The stream before every position, block by block: a block's input, its output with the
        FFN left out (the mid-block stream), its output."""
        hidden = [stream.hidden for stream in self._streams]
        for index in range(self.model.num_layers):
            with self.model.block(index) as block:
                for b, stream in enumerate(self._streams):
                    self._states.put(b, 2 * index, hidden[b])
                    with _without(block, self.model.arch, index, {"mlp"}):
                        self._states.put(b, 2 * index + 1, self._run(block, index, stream, hidden[b]))
                    hidden[b] = self._run(block, index, stream, hidden[b])
        for b in range(len(self._streams)):
            self._states.put(b, self.num_players, hidden[b])
        self._values[frozenset()] = self._losses([hidden])[0]

    def _group_values(self, group: list[frozenset[int]]) -> list[float]:
        """Each coalition from its cached start, through the blocks after it, read once for the group."""
        plans = []
        for removed in group:
            resume, skip = resume_point(removed) if removed else (self.num_players, [])
            plans.append((resume // 2, _kinds_by_layer(skip), [self._states.get(b, min(removed) if removed else self.num_players)
                                                               for b in range(len(self.batches))]))
        for index in range(min((p[0] for p in plans), default=self.model.num_layers), self.model.num_layers):
            active = [p for p in plans if p[0] <= index and p[1].get(index) != {"attn", "mlp"}]
            if not active:
                continue
            with self.model.block(index) as block:
                for _, kinds, hidden in active:
                    with _without(block, self.model.arch, index, kinds.get(index, set())):
                        for b, stream in enumerate(self._streams):
                            hidden[b] = self._run(block, index, stream, hidden[b])
        return self._losses([p[2] for p in plans])

    def _run(self, block: Any, index: int, stream: Any, hidden: Any) -> Any:
        from surgery.layerwise import Stream

        return self.model.run(block, index, Stream(hidden, stream.calls))

    def _losses(self, hiddens: list[list[Any]]) -> list[float]:
        """Mean token loss of each coalition's last block outputs (one list of batches each), with
        the final norm and the output layer read once, the vocabulary a slice at a time."""
        finals = [[self.model.final_norm(h) for h in batches] for batches in hiddens]
        totals = [0.0] * len(hiddens)
        for b, ids in enumerate(self.batches):
            targets = ids[:, 1:].reshape(-1)
            rows = [f[b][:, :-1].reshape(-1, f[b].shape[-1]) for f in finals]
            for c, nll in enumerate(self._nll(rows, targets)):
                totals[c] += float(nll.sum())
            del rows
        return [-total / self.tokens for total in totals]

    def _nll(self, rows: list[Any], targets: Any) -> Iterator[Any]:
        """Per-token negative log-likelihood of `targets` for each matrix of final hidden rows."""
        import torch

        running = [None] * len(rows)  # (max, sum of exp, target logit) per matrix
        for start, part in self.model.logit_slices(rows):
            for c, logits in enumerate(part):
                peak = logits.max(-1).values
                inside = (targets >= start) & (targets < start + logits.shape[-1])
                picked = torch.zeros_like(peak)
                picked[inside] = logits[inside, (targets[inside] - start)]
                if running[c] is None:
                    running[c] = [peak, (logits - peak[:, None]).exp().sum(-1), picked]
                else:
                    old, total, target = running[c]
                    new = torch.maximum(old, peak)
                    total = total * (old - new).exp() + (logits - new[:, None]).exp().sum(-1)
                    running[c] = [new, total, target + picked]
        for peak, total, target in running:
            yield peak + total.log() - target


def _kinds_by_layer(skip: list[Sublayer]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for unit in skip:
        found.setdefault(unit.layer, set()).add(unit.kind)
    return found


@contextmanager
def _without(block: Any, arch: Any, index: int, kinds: set[str]) -> Iterator[Any]:
    """The loaded block with the sublayers of `kinds` as stand-ins for the `with` (weights kept)."""
    from surgery.hf_modeling import remove_sublayer

    originals: dict[str, Any] = {}
    for kind in sorted(kinds):
        originals.update(remove_sublayer(block, kind, list(arch.sublayer_modules(kind)), index, arch.mlp_extra_outputs))
    try:
        yield block
    finally:
        for name, module in originals.items():
            setattr(block, name, module)


class _States:
    """The cached stream, [batch][position] -> that batch's [B, T, H] tensor, on CPU or in one unnamed
    file in `spill` (deleted by the system when the process ends, however it ends), bit for bit."""

    def __init__(self, like: list[Any], positions: int, spill: Path | None) -> None:
        self.like = like
        self.memory: dict[tuple[int, int], Any] = {}
        self.file = None
        if spill is not None:
            import tempfile

            import numpy as np

            from surgery.files import check_free_space

            width = max(t.numel() for t in like)
            check_free_space(spill / ".surgery-stream", len(like) * positions * width * like[0].element_size(),
                             "the cached residual stream")
            self.handle = tempfile.TemporaryFile(dir=spill, prefix=".surgery-stream-")  # noqa: SIM115 (lives with the states)
            bits = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[like[0].element_size()]
            self.file = np.memmap(self.handle, dtype=bits, mode="w+", shape=(len(like), positions, width))

    def put(self, batch: int, position: int, value: Any) -> None:
        if self.file is None:
            self.memory[(batch, position)] = value.detach().cpu()
        else:
            flat = value.detach().cpu().reshape(-1)
            self.file[batch, position, :flat.numel()] = flat.view(_bits(flat)).numpy()

    def get(self, batch: int, position: int) -> Any:
        import torch

        if self.file is None:
            return self.memory[(batch, position)]
        like = self.like[batch]
        raw = torch.from_numpy(self.file[batch, position, :like.numel()])
        return raw.view(like.dtype).view(like.shape)


def _bits(tensor: Any) -> Any:
    """The integer dtype of the same width as `tensor`'s (numpy has no bfloat16: states are kept as bits)."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
