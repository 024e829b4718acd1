"""`surgery push`: publish a verified export to the Hugging Face Hub.

Only a folder whose surgery.json verifies (every file present and unchanged since export) is
pushed, without the files it lists as unpublished (local.json, the local record), and only if
what is pushed names no local path (surgery.publish). The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`) and is
never printed. `dry_run` lists exactly what would be uploaded and talks to no one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.export.checkpoint import MANIFEST, read_manifest
from surgery.publish import RECORDS, local_paths

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[tuple[str, int]]  # (name, bytes), exactly what upload_folder sends
    kept_back: tuple[str, ...] = ()  # files of the export that stay on this machine (local paths)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_push(folder: Path, repo_id: str, private: bool, *, needs_hub: bool = False) -> PushPlan:
    """What would be uploaded, after every check that needs no network (and, with needs_hub, the
    one that does: an offline push fails before it lists anything)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not _REPO_ID.match(repo_id or ""):
        raise SurgeryError(f"--repo-id '{repo_id}' is not of the form USER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise SurgeryError(f"--repo-id '{repo_id}' is not a name the Hub accepts ({str(error).splitlines()[0]})") from None
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not (folder / "README.md").is_file():
        raise SurgeryError(f"{folder} has no model card (README.md): export it with surgery prune, or add one and export again")
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in manifest["files"] and p.name != MANIFEST)
    if extra:
        raise SurgeryError(f"{folder} holds files that are not part of the verified export ({', '.join(extra)}): remove them first")
    if any(p.is_dir() for p in folder.iterdir()):
        raise SurgeryError(f"{folder} holds sub-folders that are not part of the export: remove them first")
    unpublished = set(manifest.get("unpublished", []))
    files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file() and p.name not in unpublished)
    for name, _ in files:
        if name in RECORDS:
            leaked = local_paths(json.loads((folder / name).read_text()) if name.endswith(".json") else (folder / name).read_text())
            if leaked:
                raise SurgeryError(f"{folder}/{name} names a local path ({leaked[0]}): it was exported by an older surgery; "
                                   "export the model again before publishing it")
    if needs_hub:
        _check_hub()
    return PushPlan(folder, repo_id, private, files, tuple(sorted(unpublished)))


def _check_hub() -> None:
    from surgery.source import hub_reachable

    if not hub_reachable():
        raise SurgeryError("the Hugging Face Hub is not reachable (offline or HF_HUB_OFFLINE=1): push from a machine with network")


def push(plan: PushPlan, commit_message: str = "Upload pruned model made with surgery") -> str:
    """Create the repo (if needed) and upload the folder; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    _check_hub()
    api = HfApi()
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(plan.folder), repo_id=plan.repo_id, repo_type="model", commit_message=commit_message,
                          ignore_patterns=list(plan.kept_back) or None)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise SurgeryError(f"the Hub refused the upload to {plan.repo_id}: HTTP {status}{hint}") from None
    return str(url)
