"""`surgery push`: publish a verified export to the Hugging Face Hub.

Only a folder whose surgery.json verifies (every file present and unchanged since export) is
pushed, without the files it lists as unpublished (local.json, the local record), and only if
what is pushed names no local path (surgery.publish). The model card is rendered again for the
repository it goes to (its title and load lines name the repository, not the local folder), unless
README.md was written or edited by hand, which is pushed as it is.

Everything goes in one commit, so a failed push changes nothing. A repository that already holds
files of another upload is refused unless `replace` (then they are deleted in the same commit):
a stale `model.safetensors` beside new shards would be loaded instead of them. `--private` is
checked against an existing repository, which keeps its visibility. The token comes from
huggingface_hub's usual places (HF_TOKEN, `hf auth login`) and is never printed. A plan with
`dry_run` lists exactly what would be uploaded and talks to no one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.export.checkpoint import CARD, MANIFEST, outdated_modeling_file, read_manifest
from surgery.publish import RECORDS, local_paths

KEPT_ON_THE_HUB = (".gitattributes",)  # the Hub writes it into every new repository


@dataclass(frozen=True)
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[tuple[str, int]]  # (name, bytes), exactly what is committed
    card: str  # README.md as it is committed
    card_note: str  # how the card was made, for the terminal
    replace: bool = False
    summary: str = "Upload pruned model made with surgery"

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_push(folder: Path, repo_id: str, private: bool, *, replace: bool = False, needs_hub: bool = False) -> PushPlan:
    """What would be uploaded, after every check that needs no network (and, with needs_hub, the
    one that does: an offline push fails before it lists anything)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in (repo_id or ""):
        raise SurgeryError(f"--repo-id '{repo_id}' is not of the form USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SurgeryError(f"--repo-id '{repo_id}' is not a name the Hub accepts ({str(error).splitlines()[0]})") from None
    folder = Path(folder)
    manifest = read_manifest(folder)
    if outdated := outdated_modeling_file(folder):
        raise SurgeryError(f"{folder}/{outdated} is not this surgery's (an older one's stand-ins can break cached generation "
                           f"under newer transformers): write a copy with `surgery refresh {folder} --out NEW` and push that")
    extra = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and p.name not in manifest["files"] and p.name not in (MANIFEST, CARD))
    if extra:
        raise SurgeryError(f"{folder} holds files that are not part of the verified export ({', '.join(extra)}): remove them first")
    if any(p.is_dir() for p in folder.iterdir()):
        raise SurgeryError(f"{folder} holds sub-folders that are not part of the export: remove them first")
    card, note = _card(folder, repo_id)
    unpublished = set(manifest.get("unpublished", []))
    files = sorted((p.name, len(card.encode()) if p.name == CARD else p.stat().st_size)
                   for p in folder.iterdir() if p.is_file() and p.name not in unpublished)
    for name, _ in files:
        if name in RECORDS:
            text = card if name == CARD else (folder / name).read_text()
            leaked = local_paths(json.loads(text) if name.endswith(".json") else text)
            if leaked:
                raise SurgeryError(f"{folder}/{name} names a local path ({leaked[0]}): it was exported by an older surgery; "
                                   "export the model again before publishing it")
    if needs_hub:
        _check_hub()
    removed = manifest.get("removed_compact")
    summary = f"Upload pruned model made with surgery ({removed} removed)" if removed else PushPlan.summary
    return PushPlan(folder, repo_id, private, files, card, note, replace, summary)


def _card(folder: Path, repo_id: str) -> tuple[str, str]:
    """README.md for `repo_id`: the export's card rendered again for it (also from a downloaded copy,
    whose card names the repository it came from), or any other card as it is."""
    import re

    from surgery.card import model_card

    path = folder / CARD
    if not path.is_file():
        raise SurgeryError(f"{folder} has no model card ({CARD}): surgery prune writes one, and surgery graft of a decoder "
                           f"surgery prune exported; for a surgery cut or surgery heal export (or a graft of one), write "
                           f"{CARD} into the folder (what was removed, how it was healed, its license)")
    text = path.read_text()
    if (folder / "report.json").is_file():
        report = json.loads((folder / "report.json").read_text())
        title = re.search(r"^# (.+)$", text, re.M)
        if title and model_card(report, repo_id=title.group(1)) == text:
            return model_card(report, repo_id=repo_id), "the export's, rendered for the repository"
    return text, "not the card surgery renders for this export (edited, or written by hand): pushed as it is"


def _check_hub() -> None:
    from surgery.source import hub_reachable

    if not hub_reachable():
        raise SurgeryError("the Hugging Face Hub is not reachable (offline or HF_HUB_OFFLINE=1): push from a machine with network")


@dataclass(frozen=True)
class Pushed:
    url: str
    private: bool | None  # as the Hub reports it
    deleted: tuple[str, ...]  # files of an earlier upload deleted in the same commit


def push(plan: PushPlan, announce: Callable[[], None] = lambda: None) -> Pushed:
    """Create the repository if it does not exist, then commit the plan's files (and, with
    `replace`, the deletion of every other file) in one commit. `plan` comes from plan_push with
    needs_hub=True; `announce` is called once the repository has been checked, before anything is sent."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    created = False
    try:
        info = _existing(api, plan.repo_id)
        if info is None:
            api.create_repo(plan.repo_id, private=True if plan.private else None, repo_type="model")  # None: the owner's default
            created = True
            stale: list[str] = []
        else:
            stale = _checked_existing(plan, info)
        announce()
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.card.encode() if name == CARD else str(plan.folder / name))
                      for name, _ in plan.files]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        commit = api.create_commit(plan.repo_id, operations, commit_message=plan.summary, repo_type="model",
                                   commit_description=f"Deleted files of an earlier upload: {', '.join(stale)}" if stale else None)
        visibility = api.repo_info(plan.repo_id, repo_type="model").private
    except SurgeryError:
        raise
    except (OSError, ValueError, httpx2.HTTPError) as error:  # HfHubHTTPError is an OSError
        raise SurgeryError(_refusal(error, plan.repo_id, created)) from None
    return Pushed(str(commit.commit_url), visibility, tuple(stale))


def _existing(api: Any, repo_id: str) -> Any:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return None


def _checked_existing(plan: PushPlan, info: Any) -> list[str]:
    """The files of an existing repository that the commit deletes; refusals for what it must not overwrite."""
    if plan.private and not info.private:
        raise SurgeryError(f"{plan.repo_id} exists and is public: make it private on the Hub first, or drop --private")
    names = {name for name, _ in plan.files}
    stale = sorted({s.rfilename for s in info.siblings or []} - names - set(KEPT_ON_THE_HUB))
    if stale and not plan.replace:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise SurgeryError(f"{plan.repo_id} holds files this export does not have ({shown}): pass --replace to delete "
                           "them in the same commit, or push to another repository")
    return stale


def _refusal(error: BaseException, repo_id: str, created: bool) -> str:
    """One line for a failed push: the Hub's own reason where it gave one, and what was left behind."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        reason = (error.server_message or "").strip().splitlines()
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        line = f"the Hub refused the push to {repo_id}: HTTP {status}" + (f", {reason[0]}" if reason else "") + hint
    elif isinstance(error, ValueError):
        line = f"the Hub refused the push to {repo_id}: {' '.join(str(error).strip().splitlines()[:2])}"
    else:
        line = f"the connection to the Hub failed during the push to {repo_id} ({type(error).__name__}: {error}); push again"
    if created:
        line += f"; the new repository {repo_id} was left empty (push again, or delete it on the Hub)"
    return line
