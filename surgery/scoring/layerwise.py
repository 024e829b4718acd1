"""The loss value function of surgery.scoring.residual, for a model that does not fit in memory: the
checkpoint is read one decoder block at a time (surgery.layerwise) and every pass runs layer-major,
so each block is read once per pass whatever the number of batches and coalitions.

The reference pass caches the residual stream before every sublayer position (on CPU, or, when
it would take more than half this process's share of the free memory, in an unnamed file in
`spill_dir` that vanishes with the process), exactly as the in-memory prefix cache does. A group of
coalitions then starts each from the cached state at its first removal and runs the blocks after
it, each block read once for the whole group; the final norm and the output layer are read once
per group too, the output layer a slice of the vocabulary at a time: each slice's logits, for every
coalition and batch in turn, are reduced on the device to a running log-sum-exp and the target's
logit, so only per-token vectors come back. Values equal the in-memory ones up to float rounding
(tests/test_layerwise.py states the tolerance).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from surgery.ablation import ablated
from surgery.layerwise import vocabulary_nll
from surgery.scoring.base import ValueFunction
from surgery.scoring.residual import evaluation_cost, resumable, resume_point
from surgery.sublayers import Sublayer

GROUP = 64  # coalitions run through the blocks together, at most (their states live on CPU meanwhile)


class LayerwiseResidualLoss(ValueFunction):
    """v(S) = -(mean token loss) on the calibration batches, for a LayerwiseModel."""

    def __init__(self, model: Any, batches: list[Any], *, spill_dir: Path | None = None) -> None:
        from surgery.memory import available_memory

        super().__init__()
        self.model = model
        self.base = model  # what the analysis reads the vocabulary size from
        self.batches = batches
        self.num_players = 2 * model.num_layers
        self.tokens = sum(int(b[:, 1:].numel()) for b in batches)
        self._streams = [model.embed(ids) for ids in batches]  # each batch's block arguments (rotary embeddings, masks)
        self._sources = set(model.arch.shared_readers(model.model.config))  # (whose blocks run even where removed whole)
        self._resumes = resumable(model.arch, model.model.config)
        one = sum(s.hidden.numel() * s.hidden.element_size() for s in self._streams)  # one position, every batch
        free = available_memory("cpu")
        spill = spill_dir if spill_dir is not None and one * (self.num_players + 1) > free // 2 else None
        self._states = _States([s.hidden for s in self._streams], self.num_players + 1, spill)
        # A group holds, per coalition, its running states and their normed copies (2 x one) on CPU, and
        # the normed ones on the device while the output layer runs: at most a quarter of each memory.
        room = free // 4 // (2 * one)
        if str(model.device).startswith("cuda"):
            room = min(room, available_memory(str(model.device)) // 4 // one)
        self.default_batch = max(1, min(GROUP, room))
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

    def cost(self, removed: frozenset[int]) -> float:
        return evaluation_cost(removed, self.model.num_layers) if self._resumes or not removed else self.model.num_layers + 1

    def states_at(self, position: int) -> list[Any]:
        return [self._states.get(b, position) for b in range(len(self.batches))]

    # ------------------------------------------------------------ passes

    def _reference_pass(self) -> None:
        """The stream before every position, block by block: a block's input; the block run with its
        FFN left out (the mid-block stream); then the block's output, each sublayer computed once: the
        mid-block stream run through the block with its attention left out, or in a parallel block,
        whose FFN reads the block's input, the mid-block stream plus what the FFN alone adds to that
        input."""
        hidden = [stream.hidden for stream in self._streams]
        carried: list[dict[str, Any]] = [{} for _ in self._streams]  # (each block's run without its FFN sets the block's)
        parallel = self.model.arch.parallel
        for index in range(self.model.num_layers):
            with self.model.block(index) as block:
                for b in range(len(self._streams)):
                    block_input = hidden[b]
                    self._states.put(b, 2 * index, block_input)
                    with self._without(index, {"mlp"}, tail=True):
                        hidden[b] = self._run(block, index, b, block_input, carried[b])
                    self._states.put(b, 2 * index + 1, hidden[b])
                    with self._without(index, {"attn"}):  # (what this run hands on is discarded: a scratch copy)
                        if parallel:
                            hidden[b] = hidden[b] + (self._run(block, index, b, block_input, self._scratch(carried[b])) - block_input)
                        else:
                            hidden[b] = self._run(block, index, b, hidden[b], self._scratch(carried[b]))
        for b in range(len(self._streams)):
            self._states.put(b, self.num_players, hidden[b])
        self._values[frozenset()] = self._losses([hidden])[0]

    def _group_values(self, group: list[frozenset[int]]) -> list[float]:
        """Each coalition from its cached start, through the blocks after it, read once for the group."""
        plans = []
        for removed in group:
            if removed and not self._resumes:  # from the embeddings (scoring.residual.resumable says why)
                resume, skip, start = 0, [Sublayer.at(p) for p in removed], 0
            else:
                resume, skip = resume_point(removed) if removed else (self.num_players, [])
                start = min(removed) if removed else self.num_players
            plans.append((resume // 2, _kinds_by_layer(skip), self.states_at(start), [{} for _ in self._streams]))
        whole = {"attn", "mlp"}
        for index in range(min((p[0] for p in plans), default=self.model.num_layers), self.model.num_layers):
            active = [p for p in plans if p[0] <= index and (p[1].get(index) != whole or index in self._sources)]
            if not active:
                continue
            with self.model.block(index) as block:
                for _, kinds, hidden, carried in active:
                    with self._without(index, kinds.get(index, set())):
                        for b in range(len(self._streams)):
                            hidden[b] = self._run(block, index, b, hidden[b], carried[b])
        return self._losses([p[2] for p in plans])

    def _run(self, block: Any, index: int, batch: int, hidden: Any, carried: dict[str, Any]) -> Any:
        """Block `index`'s output for batch `batch`; `carried`: what the block before handed it, which
        this block's output replaces."""
        from surgery.layerwise import Stream

        return self.model.run(block, index, Stream(hidden, self._streams[batch].calls, carried))

    def _scratch(self, carried: dict[str, Any]) -> dict[str, Any]:
        """A copy of what the blocks before handed on, for a run whose own hand-on must not count: a
        source's attention silenced for the FFN's share still runs, on the mid-block stream, and
        would overwrite the selection it hands on, or the keys and values it stores in the container
        its readers share (SharedKV.state), with ones made from the wrong stream."""
        copy = dict(carried)
        state = self.model.arch.shared_state
        if state in copy:
            copy[state] = type(copy[state])(copy[state])
        return copy

    def _without(self, index: int, kinds: set[str], tail: bool = False) -> Any:
        """The loaded block `index` with the sublayers of `kinds` as stand-ins (weights kept); `tail`:
        its tail silenced too (the stream between its sublayers: surgery.ablation)."""
        return ablated(self.model.model, [Sublayer(index, kind) for kind in sorted(kinds)], tails=[index] if tail else [])

    def _losses(self, hiddens: list[list[Any]]) -> list[float]:
        """Mean token loss of each coalition's last block outputs (one list of batches each, emptied
        as they are normed): the final norm read once, the output layer once, a slice at a time."""
        import torch

        count = len(self.batches)
        normed = self.model.final_norms([h for batches in hiddens for h in batches])
        for batches in hiddens:
            batches.clear()  # the normed copies replace them
        # Targets: the next token at every position but each sequence's last, which is not scored (-1).
        targets = [torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1).reshape(-1) for ids in self.batches]
        rows = [h.reshape(-1, h.shape[-1]) for h in normed]
        totals = [0.0] * len(hiddens)
        for r, losses in enumerate(vocabulary_nll(self.model, rows, [targets[r % count] for r in range(len(rows))])):
            totals[r // count] += float(losses[targets[r % count] >= 0].sum())
        return [-total / self.tokens for total in totals]


def _kinds_by_layer(skip: list[Sublayer]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for unit in skip:
        found.setdefault(unit.layer, set()).add(unit.kind)
    return found


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
            from surgery.distributed import ranks

            # Every launcher process on this machine spills its own stream, at the same time, to the same disk.
            need = len(like) * positions * width * like[0].element_size() * ranks().local_world
            check_free_space(spill / ".surgery-stream", need, "the cached residual stream")
            self.handle = tempfile.TemporaryFile(dir=spill, prefix=".surgery-stream-")  # noqa: SIM115 (lives with the states)
            bits = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[like[0].element_size()]
            # The space taken now: a sparse file filled through the mapping would end in SIGBUS on a full disk.
            os.posix_fallocate(self.handle.fileno(), 0, len(like) * positions * width * like[0].element_size())
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
