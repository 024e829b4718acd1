"""Sublayer addressing: the one place that parses and prints `L12.attn`, `L12.mlp`, `L12`, ranges.

Layers are 0-based. Every decoder block `Li` holds two sublayers (the "players" of the analysis):
`Li.attn` and `Li.mlp` (an MoE block counts as the mlp). Sublayers have a total order, the order
in which the residual stream passes through them: L0.attn, L0.mlp, L1.attn, ... Its index is the
sublayer's *position* (`2*i` for attention, `2*i+1` for the mlp).

A range `A-B` is the contiguous run of sublayers from A to B inclusive in that order: `L20-L23` is
blocks 20 to 23, `L3.mlp-L5.attn` is L3.mlp, L4.attn, L4.mlp, L5.attn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from surgery.errors import SurgeryError

KINDS = ("attn", "mlp")
_UNIT = re.compile(r"^L(\d+)(?:\.(attn|mlp))?$")


@dataclass(frozen=True, order=True)
class Sublayer:
    """One attention or FFN/MoE sublayer of decoder block `layer`."""

    layer: int
    kind: str  # "attn" or "mlp"

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.layer < 0:
            raise ValueError(f"invalid sublayer L{self.layer}.{self.kind}")

    @property
    def position(self) -> int:
        """Index in residual-stream order (L0.attn=0, L0.mlp=1, L1.attn=2, ...)."""
        return 2 * self.layer + KINDS.index(self.kind)

    @classmethod
    def at(cls, position: int) -> Sublayer:
        return cls(position // 2, KINDS[position % 2])

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}"


def all_sublayers(num_layers: int) -> list[Sublayer]:
    """Every sublayer of a model with `num_layers` blocks, in residual-stream order."""
    return [Sublayer.at(p) for p in range(2 * num_layers)]


def _parse_one(token: str) -> tuple[int, int]:
    """`L5` -> positions (10, 11); `L5.mlp` -> (11, 11). Returns an inclusive position span."""
    match = _UNIT.match(token)
    if not match:
        raise SurgeryError(
            f"'{token}' is not a sublayer id: use L12 (a block), L12.attn, L12.mlp or a range such as L20-L23 (0-based)"
        )
    layer, kind = int(match.group(1)), match.group(2)
    if kind is None:
        return 2 * layer, 2 * layer + 1
    position = Sublayer(layer, kind).position
    return position, position


def _parse_token(token: str) -> list[int]:
    """One comma-separated item (an id or a range) -> the positions it covers."""
    if "-" in token:
        start_text, _, end_text = token.partition("-")
        try:
            start, _ = _parse_one(start_text.strip())
            _, end = _parse_one(end_text.strip())
        except SurgeryError:  # name what was typed ('L-1', '-10%'), not the half before the dash
            raise SurgeryError(f"'{token}' is not a sublayer id or range: use L12 (a block), L12.attn, L12.mlp "
                               "or a range such as L20-L23 (0-based, no negative numbers)") from None
        if end < start:
            raise SurgeryError(f"range '{token}' runs backwards: write the earlier sublayer first")
        return list(range(start, end + 1))
    start, end = _parse_one(token)
    return list(range(start, end + 1))


def parse_sublayers(spec: str | Iterable[str], num_layers: int | None = None) -> list[Sublayer]:
    """Parse `"L20-L23,L5.attn"` (or a list of such strings) into sorted, unique sublayers.

    Naming a sublayer twice (directly, or through a block or range that covers it) is an error, so
    that a typo in a long list cannot silently change what is removed. With `num_layers`, ids out
    of range are an error too.
    """
    tokens = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [t.strip() for t in spec]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise SurgeryError("no sublayers given: name at least one, e.g. L12, L12.attn or L20-L23")
    seen: dict[int, str] = {}
    for token in tokens:
        for position in _parse_token(token):
            if position in seen:
                raise SurgeryError(
                    f"{Sublayer.at(position)} is named twice ('{seen[position]}' and '{token}'): list each sublayer once"
                )
            seen[position] = token
    units = sorted(Sublayer.at(p) for p in seen)
    if num_layers is not None:
        check_in_range(units, num_layers)
    return units


def check_in_range(units: Iterable[Sublayer], num_layers: int) -> None:
    beyond = [unit.layer for unit in units if unit.layer >= num_layers]
    if beyond:  # the furthest one: for L0-L99 on 4 layers, L99 is what was mistyped
        raise SurgeryError(f"L{max(beyond)} is out of range: the model has {num_layers} layers (L0-L{num_layers - 1}, 0-based)")


def full_blocks(units: Iterable[Sublayer]) -> list[int]:
    """Layers whose attention and mlp are both in `units` (the blocks that go as a whole)."""
    kinds_by_layer: dict[int, set[str]] = {}
    for unit in units:
        kinds_by_layer.setdefault(unit.layer, set()).add(unit.kind)
    return sorted(layer for layer, kinds in kinds_by_layer.items() if len(kinds) == 2)


def present(units: Iterable[Sublayer], absent: Iterable[Sublayer]) -> list[Sublayer]:
    """`units` less the sublayers their blocks do not have (`absent`: a single-mixer family's, whose
    block `L5` is its one mixer, so naming the block names that); naming such a sublayer alone is an
    error, not a silent no-op."""
    units, absent = set(units), set(absent)
    lone = sorted(u for u in units & absent if Sublayer(u.layer, KINDS[1 - KINDS.index(u.kind)]) not in units)
    if lone:
        other = KINDS[1 - KINDS.index(lone[0].kind)]
        raise SurgeryError(f"{lone[0]} does not exist: block L{lone[0].layer} holds one mixer, its {other} sublayer "
                           f"(this family's blocks hold one each): name L{lone[0].layer}")
    return sorted(units - absent)


def format_sublayers(units: Iterable[Sublayer]) -> str:
    """The shortest exact text for `units`: whole blocks as `L5`, runs of blocks as `L20-L23`."""
    units = sorted(set(units))
    blocks = set(full_blocks(units))
    parts: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            parts.append(f"L{run[0]}" if len(run) == 1 else f"L{run[0]}-L{run[-1]}")
            run.clear()

    for unit in units:
        if unit.layer in blocks:
            if unit.kind == "mlp":
                continue
            if run and run[-1] != unit.layer - 1:
                flush()
            run.append(unit.layer)
        else:
            flush()
            parts.append(str(unit))
    flush()
    return ",".join(parts)


def contiguous_runs(units: Iterable[Sublayer]) -> list[list[Sublayer]]:
    """`units` split into maximal runs of consecutive positions (residual-stream order)."""
    runs: list[list[Sublayer]] = []
    for unit in sorted(set(units)):
        if runs and runs[-1][-1].position == unit.position - 1:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs
