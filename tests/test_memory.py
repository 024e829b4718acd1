"""The memory a command may take: the machine's free memory, bounded by the process's cgroups
(containers, Slurm and Kubernetes jobs), read from cgroup trees written on disk as the kernel lays
them out."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from tests.cli import one_line, run

GIB = 1 << 30


def _cgroup(folder: Path, limit: str, usage: int, stat: str = "", *, v1: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    (folder / names[0]).write_text(f"{limit}\n")
    (folder / names[1]).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(stat)


def _membership(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_room_is_the_tightest_limit_on_the_way_up_less_the_working_set(tmp_path):
    from surgery.memory import cgroup_room

    mount = tmp_path / "sys"
    # a Slurm job limited to 8 GiB, using 3 GiB of which 1 GiB is file cache (a model read earlier, say: the
    # kernel reclaims it, active or not, before it kills); its step has no limit
    _cgroup(mount / "job", str(8 * GIB), 3 * GIB, f"anon 123\ninactive_file {GIB // 4}\nactive_file {3 * GIB // 4}\n")
    _cgroup(mount / "job" / "step", "max", 3 * GIB)
    membership = _membership(tmp_path, "0::/job/step\n")
    assert cgroup_room(membership, mount) == 6 * GIB
    _cgroup(mount / "job" / "step", str(5 * GIB), 2 * GIB)  # the step's own limit is tighter
    assert cgroup_room(membership, mount) == 3 * GIB
    _cgroup(mount / "job" / "step", str(GIB), 2 * GIB)  # over its limit until the kernel reclaims: no room
    assert cgroup_room(membership, mount) == 0


def test_cgroup_v1_and_containers(tmp_path):
    from surgery.memory import cgroup_room

    mount = tmp_path / "sys"
    _cgroup(mount / "memory" / "docker" / "abc", str(4 * GIB), GIB,
            f"cache 7\ntotal_inactive_file {GIB // 4}\ntotal_active_file {GIB // 4}\n", v1=True)
    _cgroup(mount / "memory", "9223372036854771712", 20 * GIB, v1=True)  # the root: no limit
    v1 = "9:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_room(_membership(tmp_path, v1), mount) == 4 * GIB - GIB // 2
    # inside the container the mount shows its own cgroup as the root, not the path the host names
    inside = tmp_path / "inside"
    _cgroup(inside / "memory", str(2 * GIB), GIB, v1=True)
    assert cgroup_room(_membership(tmp_path, v1), inside) == GIB
    _cgroup(inside / "memory", "9223372036854771712", GIB, v1=True)
    assert cgroup_room(_membership(tmp_path, v1), inside) is None  # no limit: the machine's memory decides
    assert cgroup_room(tmp_path / "no-such-file", mount) is None  # no cgroups (not Linux, or /proc not mounted)


def test_a_container_limit_makes_the_cut_stream(tiny_folder, tmp_path, monkeypatch):
    """A machine with plenty free but a job limited below two copies of the model: the cut streams
    instead of being killed at the limit."""
    import surgery.memory as memory

    source, _ = tiny_folder("llama")
    size = memory.safetensors_bytes(source)
    monkeypatch.setattr(memory, "LIBRARY_BYTES", 0)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 1 << 40)  # a machine with 1 TiB free
    streams = partial(memory.out_of_core, source, None, device="cpu", device_map=None, copies=2, doing="cutting", instead="-")
    mount = tmp_path / "sys"
    _cgroup(mount / "job", str(5 * size // 2), size)  # room for one copy and a half, not two
    monkeypatch.setattr(memory, "cgroup_room", partial(memory.cgroup_room, _membership(tmp_path, "0::/job\n"), mount))
    assert memory.available_memory("cpu") == 5 * size // 2 - size
    assert streams()
    _cgroup(mount / "job", str(3 * size), size)  # room for two
    assert not streams()


# ------------------------------------------------------------------ the plan, from config and headers alone

LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, rope_theta=500000.0)


def sparse_checkpoint(folder: Path, model_type: str, **config: object) -> Path:
    """A checkpoint of the shapes `config` gives, in bfloat16, whose weights are all zero and take no
    disk: a sparse file behind a real safetensors header (a 140 GB model in a few KB)."""
    import torch
    from transformers import AutoConfig

    from surgery.layerwise import checkpoint_shapes, skeleton
    from surgery.shards import TensorInfo, encode_header

    made = AutoConfig.for_model(model_type, **config, dtype="bfloat16")
    folder.mkdir(parents=True)
    made.save_pretrained(folder)
    shapes = checkpoint_shapes(skeleton(made, dtype=torch.bfloat16))
    tensors = [TensorInfo(name, "BF16", shape, 2 * torch.Size(shape).numel()) for name, shape in shapes.items()]
    header, order = encode_header(tensors, {"format": "pt"})
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + sum(t.nbytes for t in order))
    return folder


@pytest.fixture
def machine(monkeypatch):
    """This process's free memory, held at what the test says (the machine's own varies)."""
    import surgery.memory as memory

    def hold(gib: int) -> None:
        monkeypatch.setattr(memory, "_meminfo_available", lambda: gib * GIB)
        monkeypatch.setattr(memory, "cgroup_room", lambda: None)

    return hold


def test_info_plans_a_70b_model_without_loading_it_and_prune_refuses_it_at_once(tmp_path, machine):
    import time

    from surgery.memory import footprint

    folder = sparse_checkpoint(tmp_path / "llama3-70b", "llama", **LLAMA3_70B)
    found = footprint(folder)
    assert found.parameters == 70_553_706_496 and found.weights == 2 * found.parameters and found.dtype == "bfloat16"
    assert (folder / "model.safetensors").stat().st_size > found.weights  # the header's few KB on top
    machine(64)
    started = time.perf_counter()
    result = run("info", folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "70,553,706,496" in text and "131.42 GiB in bfloat16" in text and "64.0 GiB" in text
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert "block by block" in rows["analyze, eval"] and "streamed file to file" in rows["cut"]
    assert "does not fit" in rows["prune"] and "QLoRA on a 4-bit" in rows["heal"]
    line = one_line(run("prune", folder, "--remove", "25%", "--out", tmp_path / "out", "--device", "cpu"))
    assert "131.4 GiB as loaded" in line and "64.0 GiB available" in line and "surgery cut --stream" in line
    assert time.perf_counter() - started < 60 and not (tmp_path / "out").exists()
    result = run("info", folder, "--device", "cpu", "--dtype", "float32")  # the route named is one the commands take
    assert "drop --dtype float32" in " ".join(result.output.replace("│", " ").split())  # (cells wrap in a narrow terminal)
    machine(512)  # a machine that holds it: the in-memory paths, as each command decides
    result = run("info", folder, "--device", "cpu")
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert "in memory" in rows["analyze, eval"] and "in memory" in rows["cut"] and "does not fit" not in rows["prune"]


# Gemma 4 E2B's text decoder as released: a per-layer embedding of 256 entries per layer beside the embeddings
GEMMA4_E2B = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
                  head_dim=256, global_head_dim=512, vocab_size=262144, vocab_size_per_layer_input=262144,
                  hidden_size_per_layer_input=256, num_kv_shared_layers=20, use_double_wide_mlp=True, tie_word_embeddings=True)


def test_a_block_by_block_plan_holds_the_embeddings_where_they_outweigh_every_block(tmp_path, machine):
    """Gemma 4 E2B's per-layer embeddings (262,144 x 35 x 256) are read whole while a batch is
    embedded, then released: the plan counts them, not the largest block, which is far smaller."""
    from surgery.memory import LIBRARY_BYTES, block_by_block_bytes, footprint

    folder = sparse_checkpoint(tmp_path / "gemma-4-e2b", "gemma4_text", **GEMMA4_E2B)
    found = footprint(folder)
    embeddings = 262144 * 1536 + 262144 * 35 * 256 + 1536 * 35 * 256 + 256  # (and their projection from the stream, its norm)
    assert found.stem == 2 * embeddings and found.stem > 10 * max(found.blocks)
    assert block_by_block_bytes(found) == found.stem + found.head_slice + LIBRARY_BYTES
    machine(4)
    result = run("info", folder, "--device", "cpu")
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert result.exit_code == 0 and "block by block" in rows["analyze, eval"], result.output
    assert "about the embeddings" in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen3_moe", "gpt_oss"])
def test_the_footprint_from_headers_is_what_loads(model_type, tiny_folder):
    """Parameters and bytes counted on the config's empty model are those of the model loaded from
    the files (tied weights once, MoE experts as stored)."""
    from surgery.export.checkpoint import weights_bytes
    from surgery.forward import count_parameters
    from surgery.loading import load_model
    from surgery.memory import footprint

    source, _ = tiny_folder(model_type)
    model = load_model(str(source), with_tokenizer=False, device="cpu").model
    for dtype in ("auto", "bfloat16"):
        found = footprint(source, dtype)
        assert found.parameters == count_parameters(model)
        assert found.weights == weights_bytes(model) // (2 if dtype == "bfloat16" else 1)
        assert len(found.blocks) == model.config.num_hidden_layers


def test_info_describes_a_sublayer_cut_from_its_files(tiny_folder, tmp_path):
    from surgery.export.checkpoint import weights_bytes
    from surgery.loading import load_model
    from surgery.memory import footprint

    source, _ = tiny_folder("llama")
    assert run("cut", source, "--remove", "L1.attn,L2", "--out", tmp_path / "cut").exit_code == 0
    cut = load_model(str(tmp_path / "cut"), with_tokenizer=False, device="cpu").model
    found = footprint(tmp_path / "cut")
    assert found.weights == weights_bytes(cut) and len(found.blocks) == 3 and found.blocks[1] < found.blocks[0]


def test_block_reads_work_in_a_single_file_larger_than_memory_and_swap(tmp_path):
    """transformers 5 saves up to 50 GB in one file; safetensors maps a file whole, copy-on-write,
    which Linux refuses beyond memory and swap. The out-of-core paths read tensors and rows alone."""
    import torch

    from surgery.shards import SafetensorsFolder, check_safetensors

    folder = sparse_checkpoint(tmp_path / "llama3-70b", "llama", **LLAMA3_70B)
    check_safetensors(folder / "model.safetensors")
    weights = SafetensorsFolder(folder)
    norm = weights.tensor("model.layers.79.input_layernorm.weight")
    assert norm.dtype == torch.bfloat16 and norm.shape == (8192,) and not norm.any()
    rows = weights.rows("lm_head.weight", 128250, 128260)  # the last 6 rows: a slice past the end stops at it
    assert rows.shape == (6, 8192) and not rows.any()
    weights.close()


@pytest.mark.parametrize("how", ["mapped", "read"])
def test_tensors_read_alone_equal_what_safetensors_reads(how, tmp_path, monkeypatch):
    """Mapped from their byte range, or read where a mapping is refused (no room to commit)."""
    import mmap

    import torch
    from safetensors.torch import load_file, save_file

    from surgery.shards import SafetensorsFolder

    if how == "read":
        def refused(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(mmap, "mmap", refused)

    torch.manual_seed(0)
    tensors = {"f32": torch.randn(5, 3), "bf16": torch.randn(7, 2).bfloat16(), "f16": torch.randn(4).half(),
               "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
               "f8": torch.randn(4, 4).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "model.safetensors")
    weights = SafetensorsFolder(tmp_path)
    expected = load_file(tmp_path / "model.safetensors")
    for name, tensor in weights.tensors(list(tensors)).items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8))
    assert torch.equal(weights.rows("bf16", 2, 5), expected["bf16"][2:5])
    weights.close()


def test_info_plans_with_a_device_map_on_any_machine(tiny_folder):
    """--device-map places a whole model itself: the plan reads the first GPU where there is one,
    the CPU here (asking CUDA for its free memory without a GPU was a traceback)."""
    source, _ = tiny_folder("llama")
    result = run("info", source, "--device-map", "auto")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    assert "in memory" in rows["cut"] and "in memory" in rows["analyze, eval"]  # nothing streams under a device map


def test_safetensors_headers_are_checked_as_safetensors_checks_them(tmp_path):
    """Valid files of every float8 kind pass, laid out as safetensors' writer lays them out; malformed
    headers are one line, not a TypeError from sorting them."""
    import json as jsonlib

    import torch
    from safetensors.torch import save_file

    from surgery.errors import SurgeryError
    from surgery.shards import TensorInfo, check_safetensors, encode_header, read_header

    tensors = {"e4fnuz": torch.zeros(3).to(torch.float8_e4m3fnuz), "e5fnuz": torch.zeros(2).to(torch.float8_e5m2fnuz),
               "e4": torch.zeros(2).to(torch.float8_e4m3fn), "i16": torch.zeros(2, dtype=torch.int16), "u8": torch.zeros(1, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "f8.safetensors")
    check_safetensors(tmp_path / "f8.safetensors")
    _, header = read_header(tmp_path / "f8.safetensors")
    infos = [TensorInfo(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
             for k, v in header.items() if k != "__metadata__"]
    _, order = encode_header(infos, None)
    written = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert [t.name for t in order] == written  # the layout safetensors' writer chose
    for change, message in ((lambda h: h["u8"].update(data_offsets=["x", h["u8"]["data_offsets"][1]]), "lists of whole numbers"),
                            (lambda h: h["u8"].update(shape=[1.0]), "lists of whole numbers"),
                            (lambda h: h["u8"].update(shape=[True]), "lists of whole numbers"),
                            (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must map text to text")):
        edited = jsonlib.loads(jsonlib.dumps(header))
        change(edited)
        text = jsonlib.dumps(edited).encode()
        text += b" " * (-len(text) % 8)
        data = (tmp_path / "f8.safetensors").read_bytes()
        length = int.from_bytes(data[:8], "little")
        (tmp_path / "bad.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
        with pytest.raises(SurgeryError, match=message):
            check_safetensors(tmp_path / "bad.safetensors")
