"""`surgery refresh`: an export whose shipped modeling file predates surgery's move to transformers
5.25 (the stand-in read the cache only as `past_key_values=`) generates wrongly from its cache;
`surgery info` and `surgery push` say so, and the refreshed copy generates right. The old file is
today's with that one line as it was, and its manifest as the old export wrote it."""

import json

import pytest
import torch

from surgery.export.checkpoint import load_exported, read_manifest
from surgery.provenance import file_sha256
from tests.cli import one_line, run

CACHE_LOOKUP = "found = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)"
FILES = {"hf": "modeling_surgery.py", "nemotron-nas": "modeling_decilm.py"}
# Whether the old file drifts once a cut removes layer 0's attention: the Nemotron-NAS layout gives
# block 0 a null attention instead (surgery.export.nemotron), whose cache slot keeps the length.
OLD_CODE_DRIFTS = {"hf": True, "nemotron-nas": False}


def write_as_before_525(folder, name):
    """The folder as a surgery from before transformers 5.25 exported it: the stand-in's old cache
    lookup in the shipped file, whose checksum the manifest records."""
    path = folder / name
    text = path.read_text()
    assert CACHE_LOOKUP in text
    path.write_text(text.replace(CACHE_LOOKUP, "found = past_key_values"))
    manifest = json.loads((folder / "surgery.json").read_text())
    manifest["files"][name] = file_sha256(path)
    (folder / "surgery.json").write_text(json.dumps(manifest, indent=2) + "\n")


def cached_drift(folder) -> float:
    """How far the logits of 4 tokens decoded after a 4-token prefill from the cache lie from one
    pass over all 8, in the folder's own code (as its users load it)."""
    model = load_exported(folder, via="remote-code")  # (the folder's own file, whatever the process registered)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        prefill = model(ids[:, :4], use_cache=True)
        step = model(ids[:, 4:], cache=prefill.cache, use_cache=True).logits
    return (whole[:, 4:] - step).abs().max().item()


@pytest.fixture(params=sorted(FILES))
def old_export(request, tiny_folder, tmp_path):
    """A cut of layer 0's attention (whose cache slot gives the cache its length), exported before 5.25."""
    layout = request.param
    source = tiny_folder("llama", num_layers=4)[0]
    out = tmp_path / f"old-{layout}"
    assert run("cut", source, "--remove", "L0.attn", "--format", layout, "--out", out, "--device", "cpu", catch=False).exit_code == 0
    write_as_before_525(out, FILES[layout])
    return out, layout


def test_an_old_export_is_flagged_and_its_refreshed_copy_generates_right(old_export, tmp_path):
    folder, layout = old_export
    name = FILES[layout]
    before = {path.name: file_sha256(path) for path in folder.iterdir()}
    assert (cached_drift(folder) > 1e-2) == OLD_CODE_DRIFTS[layout]  # the bug the refresh is for, under this transformers

    info = run("info", folder, catch=False)
    assert info.exit_code == 0 and f"{name} is another surgery version's" in info.output
    line = one_line(run("push", folder, "--repo-id", "someone/old", "--dry-run"))
    assert f"{name} is not this surgery's" in line and "surgery refresh" in line

    out = tmp_path / "refreshed"
    result = run("refresh", folder, "--out", out, catch=False)
    assert result.exit_code == 0 and "checked: reload" in result.output, result.output
    assert cached_drift(out) < 1e-4
    assert {path.name: file_sha256(path) for path in folder.iterdir()} == before  # the source as it was
    manifest = read_manifest(out)  # every checksum holds, the new file's included
    assert manifest["code_refreshed"]["previous_sha256"] == before[name]
    assert manifest["code_refreshed"]["verified"]["cached_generation"] is True
    assert {n: d for n, d in manifest["files"].items() if n != name} == \
           {n: d for n, d in json.loads((folder / "surgery.json").read_text())["files"].items() if n != name}
    assert "model code" not in run("info", out, catch=False).output
    assert "write README.md into the folder" in one_line(run("push", out, "--repo-id", "someone/new", "--dry-run"))  # the next check

    again = run("refresh", out, "--out", tmp_path / "again", catch=False)
    assert again.exit_code == 0 and "nothing written" in again.output and not (tmp_path / "again").exists()


def test_where_two_copies_do_not_fit_the_refreshed_file_is_built_without_weights(tiny_folder, tmp_path, monkeypatch):
    import surgery.memory

    source = tiny_folder("llama", num_layers=4)[0]
    export = tmp_path / "export"
    assert run("cut", source, "--remove", "L0.attn", "--out", export, "--device", "cpu").exit_code == 0
    write_as_before_525(export, "modeling_surgery.py")
    monkeypatch.setattr(surgery.memory, "available_memory", lambda device="cpu", alone=False: 1 << 10)  # nothing fits
    result = run("refresh", export, "--out", tmp_path / "refreshed", catch=False)
    assert result.exit_code == 0 and "checked: built without weights" in " ".join(result.output.split()), result.output
    assert read_manifest(tmp_path / "refreshed")["code_refreshed"]["verified"]["loader"] == "trust_remote_code"
    monkeypatch.undo()
    assert cached_drift(tmp_path / "refreshed") < 1e-4


def test_comments_and_docstrings_are_not_another_version(tiny_folder, tmp_path):
    from surgery.export.checkpoint import outdated_modeling_file

    source = tiny_folder("llama", num_layers=4)[0]
    out = tmp_path / "cut"
    assert run("cut", source, "--remove", "L0.attn", "--out", out, "--device", "cpu").exit_code == 0
    path = out / "modeling_surgery.py"
    text = path.read_text()
    path.write_text(text.replace('"""Write a placeholder of the right length', '"""Write a placeholder, say, of the right length')
                    .replace("# transformers 5.25 calls the cache", "# (reworded) transformers 5.25 calls the cache"))
    assert path.read_text() != text and outdated_modeling_file(out) is None
    path.write_text(text.replace(CACHE_LOOKUP, "found = past_key_values"))
    assert outdated_modeling_file(out) == "modeling_surgery.py"
    path.write_text(text + "\nif\n")  # not Python
    assert outdated_modeling_file(out) == "modeling_surgery.py"


def test_refresh_refuses_what_it_cannot_refresh(tiny_folder, tmp_path):
    source = tiny_folder("llama", num_layers=4)[0]
    blocks = tmp_path / "blocks"
    assert run("cut", source, "--remove", "L1", "--out", blocks, "--device", "cpu").exit_code == 0
    assert "ships no modeling file" in one_line(run("refresh", blocks, "--out", tmp_path / "x"))
    assert "no surgery.json" in one_line(run("refresh", source, "--out", tmp_path / "x"))
    sublayer = tmp_path / "sublayer"
    assert run("cut", source, "--remove", "L0.attn", "--out", sublayer, "--device", "cpu").exit_code == 0
    write_as_before_525(sublayer, "modeling_surgery.py")
    one_line(run("refresh", sublayer, "--out", sublayer))  # never written over
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "--force" in one_line(run("refresh", sublayer, "--out", tmp_path / "taken"))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()
    read_manifest(sublayer)  # its files as the old export wrote them


def test_an_export_from_the_hub_cache_is_refreshed_into_plain_files(tiny_folder, tmp_path, monkeypatch):
    """A Hub id, as snapshot_download leaves it: files linked to blobs, and the local record (never
    pushed) absent. The copy holds the files themselves."""
    from huggingface_hub import constants

    source = tiny_folder("llama", num_layers=4)[0]
    export = tmp_path / "export"
    assert run("cut", source, "--remove", "L0.attn", "--out", export, "--device", "cpu").exit_code == 0
    write_as_before_525(export, "modeling_surgery.py")
    unpublished = set(json.loads((export / "surgery.json").read_text()).get("unpublished", []))
    repo = tmp_path / "hub" / "models--someone--old-cut"
    snapshot = repo / "snapshots" / ("b" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in export.iterdir():
        if path.name not in unpublished:
            blob = repo / "blobs" / file_sha256(path)
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    out = tmp_path / "refreshed"
    result = run("refresh", "someone/old-cut", "--out", out, catch=False)
    assert result.exit_code == 0, result.output
    assert not any(path.is_symlink() for path in out.iterdir())
    assert cached_drift(out) < 1e-4
    read_manifest(out)
