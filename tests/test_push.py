"""`surgery push`: what it would send (offline), and what it sends, through huggingface_hub's real
client, to a Hub on 127.0.0.1 (tests/fake_hub.py): one commit of exactly the export, the card
rendered for the repository, existing repositories' files and visibility respected, and every
refusal of the Hub as one line."""

import json
import os
import subprocess
import sys

import pytest

from tests.cli import one_line, run
from tests.fake_hub import FakeHub, Repo

TOKEN = "hf_secret_token_value"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def source(tiny_folder):
    return tiny_folder("qwen2", num_layers=6)[0]


@pytest.fixture
def export(source, tmp_path, data_dir):
    """A tiny prune's export: what push publishes."""
    out = tmp_path / "export"
    assert run("prune", source, "--out", out, "--strategy", "last", "--remove", "1", "--data-dir", data_dir,
               "--eval-tasks", "none", "--eval-ppl", "none", "--no-eval-speed", "--device", "cpu").exit_code == 0
    return out


@pytest.fixture
def hub():
    fake = FakeHub()
    server = fake.serve()
    yield fake
    server.shutdown()
    server.server_close()


def push(hub, *args):
    """`surgery push ARGS` in a child process whose huggingface_hub talks to the fake Hub."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-m", "surgery", "push", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    done.output = done.stdout + done.stderr  # the console writes to stderr
    assert TOKEN not in done.output
    return done


def refused(done) -> str:
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.output
    return lines[0]


def failed_upload(done) -> str:
    """A failure once the upload was announced: the listing, then one error line, exit code 2."""
    lines = [line for line in done.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert done.returncode == 2 and errors == [lines[-1]] and "Traceback" not in done.output, done.output
    return lines[-1]


def test_push_dry_run_lists_exactly_the_export(export):
    result = run("push", export, "--repo-id", "someone/tiny-pruned", "--dry-run")
    assert result.exit_code == 0
    published = sorted(p.name for p in export.iterdir() if p.name != "local.json")  # the local record stays here
    listed = result.output.strip().splitlines()[-len(published):]
    assert sorted(listed) == published and "local.json" not in result.output
    assert "README.md" in listed and "surgery.json" in listed and "model.safetensors" in listed


def test_push_refuses_what_is_not_a_verified_export(export, tmp_path):
    assert "USER/NAME" in one_line(run("push", export, "--repo-id", "no-slash"))
    assert "not a name the Hub accepts" in one_line(run("push", export, "--repo-id", "someone/x..", "--dry-run"))
    (export / "notes.txt").write_text("scratch")
    assert "not part of the verified export (notes.txt)" in one_line(run("push", export, "--repo-id", "someone/x", "--dry-run"))
    (export / "notes.txt").unlink()
    (export / "config.json").write_text((export / "config.json").read_text() + " ")
    assert "changed after export" in one_line(run("push", export, "--repo-id", "someone/x", "--dry-run"))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not a surgery export" in one_line(run("push", plain, "--repo-id", "someone/x"))


def test_push_offline_stops_before_the_network(export, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    result = run("push", export, "--repo-id", "someone/tiny-pruned")
    assert "not reachable" in one_line(result)  # nothing listed as if it were on its way


def test_push_commits_exactly_the_export_once_with_the_card_for_the_repository(export, hub, tmp_path):
    done = push(hub, export, "--repo-id", "someone/tiny-pruned")
    assert done.returncode == 0, done.output
    assert "(public)" in done.output
    repo = hub.repos["someone/tiny-pruned"]
    published = {p.name for p in export.iterdir()} - {"local.json"}
    assert set(repo.files) == published | {".gitattributes"} and len(repo.commits) == 1
    assert "L" in repo.commits[0] and "removed" in repo.commits[0]  # the summary says what was removed
    for name in published - {"README.md"}:
        assert repo.files[name] == (export / name).read_bytes(), name
    card = repo.files["README.md"].decode()
    assert 'from_pretrained("someone/tiny-pruned")' in card and "# someone/tiny-pruned" in card
    assert 'from_pretrained("export")' in (export / "README.md").read_text()  # the local card names the folder
    create = next(body for method, path, body in hub.requests if path == "/api/repos/create")
    assert "visibility" not in create and "private" not in create  # the owner's default visibility, not "public"

    # what anyone downloads from the repository verifies as an export, and can be pushed again as it is
    copy = tmp_path / "downloaded"
    copy.mkdir()
    for name, data in repo.files.items():
        if name != ".gitattributes":
            (copy / name).write_bytes(data)
    mirrored = push(hub, copy, "--repo-id", "someone/mirror")
    assert mirrored.returncode == 0, mirrored.output
    assert hub.repos["someone/mirror"].files["README.md"].decode().count("someone/mirror") >= 2


def test_a_repository_with_files_of_another_upload_is_refused_unless_replace(export, hub):
    """A stale single model.safetensors beside new shards is what transformers loads first."""
    stale = {"model-00001-of-00002.safetensors": b"old", "modeling_surgery.py": b"old"}
    hub.repos["someone/tiny-pruned"] = Repo(private=False)
    hub.repos["someone/tiny-pruned"].files.update(stale)
    line = refused(push(hub, export, "--repo-id", "someone/tiny-pruned"))
    assert "model-00001-of-00002.safetensors" in line and "--replace" in line
    assert hub.repos["someone/tiny-pruned"].commits == []  # nothing sent

    done = push(hub, export, "--repo-id", "someone/tiny-pruned", "--replace")
    assert done.returncode == 0, done.output
    repo = hub.repos["someone/tiny-pruned"]
    assert not set(stale) & set(repo.files) and len(repo.commits) == 1  # deleted in the same commit
    assert "deleted 2 files of an earlier upload" in done.output


def test_private_is_never_ignored(export, hub):
    hub.repos["someone/public"] = Repo(private=False)
    line = refused(push(hub, export, "--repo-id", "someone/public", "--private"))
    assert "exists and is public" in line and hub.repos["someone/public"].commits == []
    done = push(hub, export, "--repo-id", "someone/new", "--private")
    assert done.returncode == 0 and "(private)" in done.output, done.output
    assert hub.repos["someone/new"].private


def test_the_hubs_refusals_are_one_line_with_its_reason(export, hub):
    hub.refuse["commit"] = (400, "Your storage quota of 100GB for private repositories is exceeded")
    line = failed_upload(push(hub, export, "--repo-id", "someone/full"))
    assert "HTTP 400" in line and "storage quota" in line and "left empty" in line  # the repo was created by this push
    hub.refuse["commit"] = (401, "Invalid credentials in Authorization header")
    assert "hf auth login" in failed_upload(push(hub, export, "--repo-id", "someone/full"))
    hub.refuse.clear()
    hub.drop.add("preupload")
    line = failed_upload(push(hub, export, "--repo-id", "someone/full"))
    assert "connection to the Hub failed" in line and "left empty" not in line  # it existed already
    assert hub.repos["someone/full"].commits == []


def test_a_cut_export_is_pushed_with_a_card_written_by_hand(source, hub, tmp_path):
    out = tmp_path / "cut"
    assert run("cut", source, "--remove", "L1", "--out", out, "--device", "cpu").exit_code == 0
    line = one_line(run("push", out, "--repo-id", "someone/cut", "--dry-run"))
    assert "write README.md into the folder" in line
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# someone/cut\nL1 removed by surgery cut.\n")
    result = run("push", out, "--repo-id", "someone/cut", "--dry-run")
    assert result.exit_code == 0 and "pushed as it is" in result.output
    done = push(hub, out, "--repo-id", "someone/cut")
    assert done.returncode == 0, done.output
    assert hub.repos["someone/cut"].files["README.md"] == (out / "README.md").read_bytes()


def test_an_edited_card_is_pushed_as_it_is(export, hub):
    card = (export / "README.md").read_text().replace("# export", "# My pruned model")
    (export / "README.md").write_text(card)
    done = push(hub, export, "--repo-id", "someone/edited")
    assert done.returncode == 0 and "pushed as it is" in done.output, done.output
    assert hub.repos["someone/edited"].files["README.md"].decode() == card


def test_the_card_passes_the_license_on_and_names_only_a_sure_base_model(tmp_path):
    from surgery.card import source_card_metadata

    fine_tune = tmp_path / "my-fine-tune"  # a local fine-tune: its card's base_model is its own parent
    fine_tune.mkdir()
    (fine_tune / "README.md").write_text("---\nbase_model: meta-llama/Llama-3.2-1B\nlicense: other\n"
                                         "license_name: llama3.2\nlicense_link: https://example.org/LICENSE\n---\n# tuned\n")
    meta = source_card_metadata({"spec": str(fine_tune), "kind": "folder"}, fine_tune)
    assert meta == {"license": "other", "license_name": "llama3.2", "license_link": "https://example.org/LICENSE"}
    assert source_card_metadata({"spec": "org/model@main", "kind": "hub"}, None) == {"base_model": "org/model"}
    assert source_card_metadata({"spec": "smollm2-135m", "kind": "alias"}) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}


def test_the_card_says_only_what_the_export_has(export):
    card = (export / "README.md").read_text()
    assert "license:" not in card  # a tiny model from a folder without a card: unknown, not "other"
    assert "Zero-shot accuracy" not in card and "perplexity by" not in card  # neither was measured
    report = json.loads((export / "report.json").read_text())
    assert report["card_metadata"] == {"modeling_file": None}  # whole blocks: no remote code


def test_a_hub_source_brings_its_card_and_license():
    """The license passed on is read from the source's README.md, which the download must include."""
    from huggingface_hub.utils import filter_repo_objects

    import surgery.source as source

    repository = ["README.md", "LICENSE", "LICENSE.txt", "model.safetensors", "pytorch_model.bin", "config.json",
                  "original/consolidated.00.pth", "original/params.json", "consolidated.safetensors"]
    kept = list(filter_repo_objects(repository, allow_patterns=source._hub_patterns(allow_pickle=False),
                                    ignore_patterns=source._HUB_IGNORED))
    assert sorted(kept) == ["LICENSE", "LICENSE.txt", "README.md", "config.json", "model.safetensors"]  # no second copy
    with_pickles = list(filter_repo_objects(repository, allow_patterns=source._hub_patterns(True, repository),
                                            ignore_patterns=source._HUB_IGNORED))
    assert "pytorch_model.bin" not in with_pickles  # --allow-pickle takes pickles only where no safetensors are
    pickles_only = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert list(filter_repo_objects(pickles_only, allow_patterns=source._hub_patterns(True, pickles_only))) == pickles_only
