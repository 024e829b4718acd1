"""Safe, verified, atomic checkpoint export; the one module that writes model folders.

A checkpoint is written into a hidden staging folder next to `out`, reloaded the way its users
will load it (plain `from_pretrained`; `trust_remote_code=True` for sublayer-pruned ones),
checked against the in-memory model (logits on a fixed prompt and greedy generation with the KV
cache), and only then moved into place. On any failure the staging folder is deleted and `out`
is left as it was. The folder carries `surgery.json`, which records what was removed, from what,
with which versions, and the SHA-256 of every file, so that `surgery push` can refuse anything
that is not a complete, verified export.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.arch import SURGERY_MODEL_TYPE_PREFIX, base_model_type, unwrap
from surgery.errors import SurgeryError
from surgery.provenance import file_sha256, now, versions

MANIFEST = "surgery.json"
MODELING_FILE = "modeling_surgery.py"
EXPORT_FORMAT = "surgery-export"
EXPORT_VERSION = 1
VERIFY_PROMPT = "The capital of France is Paris. The capital of Italy is"
_LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_logit_diff: float
    loader: str
    manifest: dict[str, Any]


def check_output_path(out: Path, *, force: bool, protected: list[Path] = ()) -> Path:
    """Fail before any work if `out` cannot be written safely; return it absolute."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"--out {out} is a file: give a folder path")
    check_apart(out, protected)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SurgeryError(f"--out {out} exists and is not empty: choose a new folder or pass --force to replace it")
    _check_writable_parent(out, "--out")
    return out


def check_output_file(out: Path, *, force: bool, protected: list[Path] = (), option: str = "--out") -> Path:
    """The same checks for a single file (a results JSON): never inside a source model, never an
    existing file without force, and a parent that is a folder we can write to."""
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise SurgeryError(f"{option} {out} is a folder: give a file name such as results.json")
    check_apart(out, protected, option)
    if out.exists() and not force:
        raise SurgeryError(f"{option} {out} already exists: choose another name or pass --force to replace it")
    _check_writable_parent(out, option)
    return out


def check_apart(path: Path, protected: list[Path], option: str = "--out") -> None:
    """Refuse a path that is, holds or lies inside a folder that must not change (a source model)."""
    target = Path(path).expanduser().resolve()
    for source in protected:
        source = Path(source).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise SurgeryError(f"{option} {path} overlaps {source}: choose a separate folder (a source model is never written to)")


def _check_writable_parent(path: Path, option: str) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SurgeryError(f"{option} {path} lies under {parent}, which is a file: choose a path in a folder")
    if not os.access(parent, os.W_OK):
        raise SurgeryError(f"cannot write to {parent}: choose an {option} you can write to")


def export_checkpoint(
    model: Any,
    tokenizer: Any,
    out: Path,
    *,
    record: dict[str, Any],
    force: bool = False,
    protected: list[Path] = (),
    extra_files: dict[str, str] | None = None,
    copy_from: Path | None = None,
    finalize: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Write `model` (a pruned model in memory) to `out`, verified and atomically.

    record: what goes into surgery.json beside the fields written here (removed units, source,
    parameter counts, healing, ...). extra_files: name -> text written into the folder (model
    card). copy_from: the source folder, whose licence files are carried over. finalize(folder):
    called after verification, before the manifest, to add files (report, card) that may need
    the written checkpoint; they are covered by the manifest's checksums.
    """
    out = check_output_path(out, force=force, protected=list(protected))
    model = unwrap(model)
    _check_free_space(model, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        _write(model, tokenizer, staging, copy_from, extra_files or {})
        diff, loader = verify_checkpoint(model, tokenizer, staging)
        if finalize is not None:
            finalize(staging)
        manifest = _manifest(staging, record, diff, loader)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _normal_permissions(staging)
        _move_into_place(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise SurgeryError(f"no space left on the device while writing {out}: free some space or choose another --out") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, diff, loader, manifest)


def _check_free_space(model: Any, out: Path) -> None:
    need = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need * 1.05 + (64 << 20):
        raise SurgeryError(
            f"not enough disk space for the checkpoint at {out}: it needs about {need / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free; free some space or choose another --out"
        )


def write_model_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a (possibly sublayer-pruned) in-memory model so that it loads back as itself."""
    model = unwrap(model)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if getattr(model.config, "surgery", None):
        _make_self_describing(folder, model.config)


def _write(model: Any, tokenizer: Any, folder: Path, copy_from: Path | None, extra_files: dict[str, str]) -> None:
    write_model_folder(model, tokenizer, folder)
    if copy_from is not None:
        for licence in sorted(Path(copy_from).glob("LICEN[CS]E*")):
            shutil.copy2(licence, folder / licence.name)
    for name, text in extra_files.items():
        (folder / name).write_text(text)


def modeling_file_text(base_type: str) -> str:
    """The modeling file shipped in sublayer-pruned checkpoints: surgery.hf_modeling plus classes."""
    from surgery import hf_modeling

    config_class, model_class = hf_modeling.surgery_classes(base_type)
    footer = (
        "\n\n# The classes named by this checkpoint's auto_map, and by their own names: a model loaded\n"
        "# from here and saved again with save_pretrained names them so in its auto_map.\n"
        f'SurgeryConfig, SurgeryForCausalLM = surgery_classes("{base_type}")\n'
        f"{config_class.__name__}, {model_class.__name__} = SurgeryConfig, SurgeryForCausalLM\n"
    )
    return inspect.getsource(hf_modeling) + footer


def _make_self_describing(folder: Path, config: Any) -> None:
    """Mark a sublayer-pruned checkpoint with its own model type and ship the code that builds it."""
    base_type = base_model_type(config)
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    from surgery.hf_modeling import surgery_classes

    _, model_class = surgery_classes(base_type)
    data["model_type"] = SURGERY_MODEL_TYPE_PREFIX + base_type
    data["architectures"] = [model_class.__name__]
    data["auto_map"] = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.SurgeryConfig",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SurgeryForCausalLM",
    }
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (folder / MODELING_FILE).write_text(modeling_file_text(base_type))


def load_exported(folder: Path, *, dtype: Any = None, device: str = "cpu", via: str = "auto") -> Any:
    """Load a checkpoint as its users would: plain transformers (with its own code if it ships one).

    via="remote-code" uses the shipped modeling file, "package" surgery's registered classes.
    """
    from transformers import AutoModelForCausalLM

    data = json.loads((Path(folder) / "config.json").read_text())
    is_surgery = data.get("model_type", "").startswith(SURGERY_MODEL_TYPE_PREFIX)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if is_surgery and via == "package":
        from surgery.models import register_surgery_checkpoint_classes

        register_surgery_checkpoint_classes(data)
    elif is_surgery:
        kwargs["trust_remote_code"] = True
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return model.to(device).eval()


def verify_checkpoint(model: Any, tokenizer: Any, folder: Path) -> tuple[float, str]:
    """Reload `folder` and compare with `model`: logits on a fixed prompt, then cached greedy decoding."""
    import torch

    from surgery.console import quiet_transformers

    quiet_transformers()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    reloaded = load_exported(folder, dtype=dtype, device=str(device))
    loader = "trust_remote_code" if getattr(reloaded.config, "surgery", None) else "transformers"
    ids = verification_ids(tokenizer, model.config.vocab_size).to(device)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
        actual = reloaded(ids, use_cache=False).logits.float()
        diff = (expected - actual).abs().max().item()
        tolerance = _LOGIT_TOLERANCE.get(str(dtype).removeprefix("torch."), 5e-2)
        if not diff <= tolerance:
            raise SurgeryError(f"export check failed: the reloaded checkpoint's logits differ by {diff:.3g} (> {tolerance}); nothing was written")
        settings = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=_pad_id(model))
        want = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        got = reloaded.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    if not torch.equal(want, got):
        raise SurgeryError("export check failed: the reloaded checkpoint generates differently with its KV cache; nothing was written")
    del reloaded
    return diff, loader


def verification_ids(tokenizer: Any, vocab_size: int) -> Any:
    import torch

    if tokenizer is not None:
        ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
        if ids.numel() and int(ids.max()) < vocab_size:
            return ids
    return (torch.arange(3, 19) * 7919 % vocab_size).unsqueeze(0)


def _pad_id(model: Any) -> int:
    config = getattr(model, "generation_config", None) or model.config
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _manifest(folder: Path, record: dict[str, Any], diff: float, loader: str) -> dict[str, Any]:
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "created": now(),
        **record,
        "verified": {"max_abs_logit_diff": diff, "loader": loader, "prompt": VERIFY_PROMPT, "cached_generation": True},
        "versions": versions(),
        "files": files,
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a verified export, or a clear error if the folder is not one (or was changed)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SurgeryError(f"{folder} is not a folder: give the folder written by surgery cut or surgery prune")
    if not path.is_file():
        raise SurgeryError(f"{folder} has no {MANIFEST}: it is not a surgery export (write one with surgery cut or surgery prune)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise SurgeryError(f"{path} is not valid JSON: export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT or "verified" not in manifest \
            or not isinstance(manifest.get("files", {}), dict):
        raise SurgeryError(f"{path} does not describe a verified surgery export: export the model again")
    for name, digest in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise SurgeryError(f"{folder} is incomplete: {name} is missing; export the model again")
        if file_sha256(file) != digest:
            raise SurgeryError(f"{folder}/{name} changed after export (checksum differs): export the model again")
    return manifest


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _normal_permissions(folder: Path) -> None:
    """Staging folders (and some writers' files) are private; the export is as public as the umask allows."""
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, backup / "old")
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(backup / "old", out)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, out)
