import pytest

from surgery.errors import SurgeryError
from surgery.sublayers import Sublayer, all_sublayers, format_sublayers, full_blocks, parse_sublayers


def ids(units):
    return [str(u) for u in units]


def test_blocks_sublayers_and_ranges_parse_in_residual_order():
    assert ids(parse_sublayers("L5.attn")) == ["L5.attn"]
    assert ids(parse_sublayers("L2")) == ["L2.attn", "L2.mlp"]
    assert ids(parse_sublayers("L20-L22")) == ["L20.attn", "L20.mlp", "L21.attn", "L21.mlp", "L22.attn", "L22.mlp"]
    assert ids(parse_sublayers("L3.mlp-L5.attn")) == ["L3.mlp", "L4.attn", "L4.mlp", "L5.attn"]
    assert ids(parse_sublayers("L7.mlp, L1.attn")) == ["L1.attn", "L7.mlp"]
    assert ids(parse_sublayers(["L0", "L1.mlp"])) == ["L0.attn", "L0.mlp", "L1.mlp"]


def test_position_round_trip_and_order():
    units = all_sublayers(3)
    assert [u.position for u in units] == list(range(6))
    assert all(Sublayer.at(u.position) == u for u in units)
    assert Sublayer(1, "mlp") > Sublayer(1, "attn") > Sublayer(0, "mlp")


def test_format_is_compact_and_parses_back():
    units = parse_sublayers("L20-L23,L5.attn,L7,L9.mlp,L10")
    text = format_sublayers(units)
    assert text == "L5.attn,L7,L9.mlp,L10,L20-L23"
    assert parse_sublayers(text) == units
    assert full_blocks(units) == [7, 10, 20, 21, 22, 23]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("X5", "is not a sublayer id"),
        ("L5.ffn", "is not a sublayer id"),
        ("L-1", "is not a sublayer id"),
        ("L5-L3", "runs backwards"),
        ("L5,L5.attn", "L5.attn is named twice"),
        ("L1.mlp,L1.mlp", "named twice"),
        ("L2-L4,L3.mlp", "L3.mlp is named twice"),
        ("", "no sublayers given"),
        (" , ", "no sublayers given"),
    ],
)
def test_bad_ids_are_one_line_errors(spec, message):
    with pytest.raises(SurgeryError, match=message) as error:
        parse_sublayers(spec)
    assert "\n" not in str(error.value)


def test_out_of_range_names_the_valid_range():
    with pytest.raises(SurgeryError, match=r"L30 is out of range: the model has 30 layers \(L0-L29"):
        parse_sublayers("L30.attn", num_layers=30)
    assert ids(parse_sublayers("L29", num_layers=30)) == ["L29.attn", "L29.mlp"]
