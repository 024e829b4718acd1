"""Safetensors folders tensor by tensor: the one home of reading their headers, of splitting a
checkpoint into shards as transformers does, and of writing and checking shard files by streaming
bytes.

A checkpoint larger than memory is cut by copying byte ranges from the source's files into new
shards (`write_shard`), one buffer at a time, so memory never holds a whole tensor, let alone a
shard; the copy is then checked by reading the written files back (`check_shard`). The split, the
file names and the index are transformers' own (`plan_shards` calls huggingface_hub's splitter as
save_pretrained does, `write_index` writes what it writes), so loaders cannot tell a streamed
checkpoint from a saved one. Files are written in the byte layout of safetensors' own writer.
Torch is needed only to hand tensors to a model (`SafetensorsFolder.tensor`, `.rows`).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FILENAME_PATTERN = "model{suffix}.safetensors"
CHUNK_BYTES = 16 << 20
# safetensors' dtype order: its writer lays tensors out by descending dtype, then by name.
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, or one to be written: where its bytes are, not the bytes."""

    name: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None
    start: int = 0  # offset of its first byte in `file`


def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file; a one-line error for a file that is not
    one or is shorter or longer than its header says (a truncated download)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length <= 0 or 8 + length > size:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise SurgeryError(f"{file} is not a valid safetensors file ({error}): download or export it again") from None
    if 8 + length + end != size:
        raise SurgeryError(f"{file} is truncated or corrupt ({size} bytes, header says {8 + length + end}): "
                           "download or export it again")
    return 8 + length, header


def check_safetensors(file: Path) -> None:
    """Read the header and check the file is as long as it says (catches truncated downloads), then
    every tensor's type and place by safetensors' own rules (its `Metadata::validate`: known dtypes,
    tensors back to back from offset 0, each as long as its shape and dtype make it). From the header
    alone: opening the file with safetensors maps it copy-on-write, which Linux refuses for a file
    larger than memory and swap, the very files the out-of-core paths are for."""
    _, header = read_header(file)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SurgeryError(f"{file} is not a valid safetensors file (its __metadata__ must map text to text): "
                           "download or export it again")
    entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
    for name, entry in entries:
        problem = _entry_problem(entry)
        if problem:
            raise SurgeryError(f"{file} is not a valid safetensors file ({name}: {problem}): download or export it again")
    end = 0
    for name, entry in sorted(entries, key=lambda item: tuple(item[1]["data_offsets"])):
        problem = _placement_problem(entry, end)
        if problem:
            raise SurgeryError(f"{file} is not a valid safetensors file ({name}: {problem}): download or export it again")
        end = entry["data_offsets"][1]


_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
                "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


TORCH_DTYPES = {name: _TORCH_NAMES[name] for name in ("F64", "F32", "BF16", "F16")}  # the floating ones a model is saved in


def _torch_dtype(name: str, file: Path | None) -> Any:
    import torch

    dtype = getattr(torch, _TORCH_NAMES.get(name, ""), None)
    if dtype is None:
        raise SurgeryError(f"{file} holds {name} tensors, which torch cannot hold: convert the weights to a float type")
    return dtype


_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
               "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
               "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
               "I64": 64, "U64": 64}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one header entry's form (safetensors' types); None if nothing."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "an entry without dtype, shape and data_offsets"
    if entry["dtype"] not in _DTYPE_BITS:
        return f"unknown dtype {entry['dtype']}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_whole(n) for n in shape) or not isinstance(offsets, list) \
            or len(offsets) != 2 or not all(_whole(n) for n in offsets):
        return "shape and data_offsets must be lists of whole numbers"
    return None


def _placement_problem(entry: dict[str, Any], start: int) -> str | None:
    """Whether a well-formed entry's bytes begin at `start` and are as many as its shape and dtype make."""
    dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
    if begin != start or stop < begin:
        return f"its bytes start at {begin}, not where the one before ends ({start})"
    bits = _DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8 or stop - begin != bits // 8:
        return f"{stop - begin} bytes for shape {list(shape)} in {dtype}"
    return None


def file_tensors(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, by name."""
    start, header = read_header(file)
    return {name: TensorInfo(name, entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0],
                             file, start + entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def weight_files(folder: Path, hint: str = "convert the weights to safetensors") -> tuple[list[str], dict[str, str] | None]:
    """The weight files a loader reads in `folder` (model.safetensors, or the shards its index
    names) and the index's weight map; a one-line error naming what the folder holds instead."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SurgeryError(f"{index} is not a safetensors index ({error}): download or export the model again") from None
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:  # an interrupted download or copy: loaders would fail late with a traceback
            raise SurgeryError(f"{index} names {missing[0]}, which is missing: download or export the model again")
        return files, weight_map
    if (folder / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], None
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors"))
    holds = f" (it holds {', '.join(others[:3])})" if others else ""
    raise SurgeryError(f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}{holds}: {hint}")


class SafetensorsFolder:
    """The tensors of a model folder by name, read lazily: the headers at once, bytes when asked.

    `read` yields a tensor's raw bytes a buffer at a time (for copying); `tensor` returns it as a
    torch tensor mapped from its own byte range of the file, `rows` a slice of its rows alone.
    hint: the fix named when the folder has no safetensors weights; strict: refuse shard tensors
    the index does not list (loaders ignore them; an export must not hold them).
    """

    def __init__(self, folder: Path, hint: str = "convert the weights to safetensors", *, strict: bool = False) -> None:
        self.folder = Path(folder)
        files, weight_map = weight_files(self.folder, hint)
        self.info: dict[str, TensorInfo] = {}
        for name in files:  # weight_files refused a missing shard
            self.info.update(file_tensors(self.folder / name))
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if k not in self.info or self.info[k].file.name != f]
            if lost:
                raise SurgeryError(f"{self.folder}/{INDEX_NAME} puts {lost[0]} in {weight_map[lost[0]]}, which does not hold it: "
                                   "download or export the model again")
            unlisted = sorted(set(self.info) - set(weight_map)) if strict else []
            if unlisted:  # loaders read only what the index lists
                raise SurgeryError(f"{self.folder}/{self.info[unlisted[0]].file.name} holds {unlisted[0]}, which {INDEX_NAME} "
                                   "does not list: download or export the model again")
        self._buffer = bytearray(CHUNK_BYTES)
        self._descriptors: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.info

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.info.values())

    def main_dtype(self) -> str:
        """The floating dtype holding most bytes (the one the model was saved in)."""
        sizes: dict[str, int] = {}
        for t in self.info.values():
            if t.dtype in TORCH_DTYPES:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
        return max(sizes, key=sizes.get) if sizes else "F32"

    def read(self, name: str) -> Iterator[memoryview]:
        """A tensor's bytes, CHUNK_BYTES at a time, in one reused buffer (use each chunk before the next)."""
        info = self.info[name]
        return read_range(self._descriptor(info.file), info.start, info.nbytes, self._buffer, info.file)

    def tensor(self, name: str) -> Any:
        return self.tensors([name])[name]

    def tensors(self, names: Iterable[str]) -> dict[str, Any]:
        """Several tensors, in the order named, each mapped from its own byte range (`_read_tensor`)."""
        return {name: self._read_tensor(self.info[name]) for name in names}

    def rows(self, name: str, start: int, stop: int) -> Any:
        """Rows start..stop of a tensor (its first dimension), mapped alone."""
        info = self.info[name]
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        stop = max(start, min(stop, info.shape[0]))
        return self._read_tensor(info, (stop - start, *info.shape[1:]), info.start + start * row_bytes)

    def _read_tensor(self, info: TensorInfo, shape: tuple[int, ...] | None = None, start: int | None = None) -> Any:
        """A tensor mapped from its own byte range of the file, copy-on-write: only the pages a
        computation touches become resident (an embedding lookup reads the prompt's rows), and
        they leave the process with the tensor. Not the whole file, as safetensors maps it: Linux
        refuses a copy-on-write mapping larger than memory and swap, and transformers 5 writes up
        to 50 GB into one file. Where even the tensor cannot be mapped, it is read into memory."""
        import mmap

        import torch

        shape = tuple(info.shape) if shape is None else shape
        dtype = _torch_dtype(info.dtype, info.file)
        count = math.prod(shape) * dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        offset = info.start if start is None else start
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(info.file, "rb") as handle:  # the mapping outlives the descriptor
                mapped = mmap.mmap(handle.fileno(), count + offset - aligned, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
            buffer: Any = mapped
        except (OSError, ValueError, AttributeError):  # no room to commit, or no MAP_PRIVATE here
            buffer, aligned = self._pread(info, offset, count), offset
        return torch.frombuffer(buffer, dtype=dtype, count=count // dtype.itemsize, offset=offset - aligned).reshape(shape)

    def _pread(self, info: TensorInfo, offset: int, count: int) -> bytearray:
        buffer = bytearray(count)
        view = memoryview(buffer)
        descriptor, done = self._descriptor(info.file), 0
        while done < count:
            try:
                read = os.preadv(descriptor, [view[done:done + (1 << 30)]], offset + done)
            except OSError as error:
                raise SurgeryError(f"{info.file} could not be read ({error.strerror}): check the disk, or download it again") from None
            if read <= 0:
                raise SurgeryError(f"{info.file} ended inside {info.name}: download or export it again")
            done += read
        return buffer

    def _descriptor(self, file: Path) -> int:
        if file not in self._descriptors:
            self._descriptors[file] = os.open(file, os.O_RDONLY)
        return self._descriptors[file]

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def read_range(descriptor: int, start: int, length: int, buffer: bytearray, file: Path) -> Iterator[memoryview]:
    view = memoryview(buffer)
    while length:
        got = os.preadv(descriptor, [view[: min(length, len(view))]], start)
        if got == 0:
            raise SurgeryError(f"{file} ended early while reading it: download or export it again")
        yield view[:got]
        start += got
        length -= got


# ------------------------------------------------------------------ writing


_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '30KB' (decimal units, as transformers and the Hub count) or bytes -> bytes."""
    value = str(text).strip()
    unit = value[-2:].upper()
    try:
        size = int(float(value[:-2]) * _SIZE_UNITS[unit]) if unit in _SIZE_UNITS else int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise SurgeryError(f"{option} '{text}' is not a size: give bytes or a number with KB, MB, GB or TB (e.g. 5GB)")
    return size


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> dict[str, list[str]]:
    """File name -> tensor names: the split save_pretrained makes of tensors of these byte sizes
    (in this order), with its file names (model.safetensors alone, else model-0000i-of-0000n)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda size: size, filename_pattern=FILENAME_PATTERN,
                                                 max_shard_size=max_shard_size)
    return split.filename_to_tensors


def encode_header(tensors: Iterable[TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorInfo]]:
    """The header safetensors' writer makes for these tensors, and the order their bytes follow it."""
    order = sorted(tensors, key=lambda t: (-_DTYPE_ORDER.index(t.dtype), t.name))
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in order:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def tensor_bytes(tensor: Any) -> memoryview:
    """A tensor's bytes as safetensors stores them (row-major, its own dtype), without a copy where
    it is contiguous: a piece for write_shard."""
    import torch

    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class WrittenShard:
    checksums: dict[str, int]  # tensor -> CRC-32 of the bytes it was given
    sha256: str  # of the file as written


def write_shard(path: Path, tensors: list[TensorInfo], chunks: Callable[[TensorInfo], Iterable[bytes | memoryview]],
                lies_in: Callable[[TensorInfo], TensorInfo | None] | None = None, metadata: dict[str, str] | None = None) -> WrittenShard:
    """Write one safetensors file, tensor by tensor, from `chunks(tensor)` (its bytes in pieces; a
    piece may be reused once the next is asked for), taking each tensor's CRC-32 and the file's SHA-256.

    lies_in(tensor): the source tensor holding the same bytes in a file. They are then copied file
    to file by the kernel, as shutil.copyfile copies, and the pieces only feed the checksums; the
    copy, the CRC and the SHA-256 run in three threads (all release the GIL). A tensor read back
    with check_shard thus proves both the layout and the copy. None for a tensor made here (a
    folded norm: surgery.scales), whose pieces are written at its place beside the copy.
    """
    from concurrent.futures import ThreadPoolExecutor

    header, order = encode_header(tensors, {"format": "pt"} if metadata is None else metadata)
    digest = hashlib.sha256(header)
    checksums = {}
    with open(path, "wb") as handle, ThreadPoolExecutor(1) as disk, ThreadPoolExecutor(1) as hashing:
        handle.write(header)
        handle.flush()
        offsets = dict(zip((t.name for t in order), itertools.accumulate((t.nbytes for t in order), initial=len(header))))
        sources = {t.name: lies_in(t) for t in order} if lies_in else {}
        copied = disk.submit(_copy_ranges, handle.fileno(), [(sources[t.name], offsets[t.name]) for t in order
                                                             if sources[t.name] is not None]) if lies_in else None
        for info in order:
            crc, seen = 0, 0
            for chunk in chunks(info):
                pending = [hashing.submit(digest.update, chunk)] + ([] if copied else [disk.submit(handle.write, chunk)])
                if copied and sources[info.name] is None:  # (made here: written at its place, the copy going on beside)
                    os.pwrite(handle.fileno(), chunk, offsets[info.name] + seen)
                crc = zlib.crc32(chunk, crc)
                seen += len(chunk)
                for job in pending:
                    job.result()
            if seen != info.nbytes:
                raise SurgeryError(f"{info.name} gave {seen} bytes where its dtype and shape need {info.nbytes}")
            checksums[info.name] = crc
        if copied:
            copied.result()
    return WrittenShard(checksums, digest.hexdigest())


def _copy_ranges(target: int, ranges: list[tuple[TensorInfo, int]]) -> None:
    """Copy each source tensor's bytes to its offset in file descriptor `target`, inside the kernel
    (read and write where a filesystem cannot copy between files)."""
    descriptors: dict[Path, int] = {}
    try:
        for source, offset in ranges:
            if source.file not in descriptors:
                descriptors[source.file] = os.open(source.file, os.O_RDONLY)
            _copy_range(descriptors[source.file], source.start, target, offset, source.nbytes)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)


def _copy_range(source: int, start: int, target: int, offset: int, length: int) -> None:
    while length:
        try:
            done = os.copy_file_range(source, target, min(length, 1 << 30), start, offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            done = os.pwrite(target, os.pread(source, min(length, CHUNK_BYTES), start), offset)
        if done == 0:
            raise SurgeryError("a source file ended early while copying it: download or export it again")
        start, offset, length = start + done, offset + done, length - done


def check_shard(path: Path, expected: dict[str, TensorInfo], checksums: dict[str, int]) -> None:
    """Read a written shard back: its header must list exactly the expected tensors with their
    dtypes and shapes, and every tensor's bytes must have the CRC-32 of the bytes it was written from."""
    found = file_tensors(path)
    if set(found) != set(expected):
        odd = sorted(set(found) ^ set(expected))
        raise SurgeryError(f"export check failed: {path.name} does not hold the tensors planned for it ({odd[0]}); nothing was written")
    buffer = bytearray(CHUNK_BYTES)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for name, info in found.items():
            want = expected[name]
            if (info.dtype, info.shape) != (want.dtype, want.shape):
                raise SurgeryError(f"export check failed: {path.name} holds {name} as {info.dtype} {list(info.shape)}, "
                                   f"not {want.dtype} {list(want.shape)}; nothing was written")
            crc = 0
            for chunk in read_range(descriptor, info.start, info.nbytes, buffer, path):
                crc = zlib.crc32(chunk, crc)
            if crc != checksums[name]:
                raise SurgeryError(f"export check failed: {name} in {path.name} differs from its source tensor "
                                   "(checksum); nothing was written")
    finally:
        os.close(descriptor)


def write_checkpoint_shards(folder: Path, tensors: dict[str, TensorInfo], chunks: Callable[[TensorInfo], Iterable[bytes | memoryview]],
                            *, max_shard_size: int, parameters: int, label: str,
                            lies_in: Callable[[TensorInfo], TensorInfo | None] | None = None) -> dict[str, str]:
    """A whole checkpoint's weights: `tensors` (name -> dtype, shape, size) in shards planned as
    transformers plans them, each written by `write_shard` (`chunks`, `lies_in` as there; the
    TensorInfo given to them is the planned one, by name) and read back by `check_shard`, and the
    index for more than one shard. Returns the SHA-256 of each shard as written."""
    shards = plan_shards({name: info.nbytes for name, info in tensors.items()}, max_shard_size)
    digests = _write_shards(folder, shards, tensors, chunks, lies_in, label)
    if len(shards) > 1:
        write_index(folder, shards, sum(info.nbytes for info in tensors.values()), parameters)
    return digests


def add_shards(folder: Path, tensors: dict[str, TensorInfo], chunks: Callable[[TensorInfo], Iterable[bytes | memoryview]],
               *, max_shard_size: int, label: str, lies_in: Callable[[TensorInfo], TensorInfo] | None = None) -> None:
    """Add `tensors` to the checkpoint already written in `folder`, as shards after its own (each
    written and read back as write_checkpoint_shards does): every file then bears the name
    transformers gives the i-th of n shards, and the index lists them all."""
    files, _ = weight_files(folder)
    held = {file: file_tensors(folder / file) for file in files}
    extra = list(plan_shards({name: info.nbytes for name, info in tensors.items()}, max_shard_size).values())
    named = [FILENAME_PATTERN.format(suffix=f"-{i:05d}-of-{len(files) + len(extra):05d}")
             for i in range(1, len(files) + len(extra) + 1)]
    shards: dict[str, list[str]] = {}
    for old, new in zip(files, named):  # the count in the names grows, so no new name is an old one
        (folder / old).rename(folder / new)
        shards[new] = list(held[old])
    added = dict(zip(named[len(files):], extra))
    _write_shards(folder, added, tensors, chunks, lies_in, label)
    shards.update(added)
    every = [*(info for infos in held.values() for info in infos.values()), *tensors.values()]
    write_index(folder, shards, sum(info.nbytes for info in every), sum(math.prod(info.shape) for info in every))


def _write_shards(folder: Path, shards: dict[str, list[str]], tensors: dict[str, TensorInfo],
                  chunks: Callable[[TensorInfo], Iterable[bytes | memoryview]],
                  lies_in: Callable[[TensorInfo], TensorInfo | None] | None, label: str) -> dict[str, str]:
    """Each planned shard (file -> tensor names) written by `write_shard` (the TensorInfo given to
    `chunks` and `lies_in` is the planned one, by name) and read back by `check_shard`; the
    SHA-256 of each."""
    from surgery.console import task

    digests = {}
    with task(label, total=len(shards)) as progress:
        for file, names in shards.items():
            planned = {name: TensorInfo(name, tensors[name].dtype, tensors[name].shape, tensors[name].nbytes) for name in names}
            written = write_shard(folder / file, list(planned.values()), chunks, lies_in)
            check_shard(folder / file, planned, written.checksums)
            digests[file] = written.sha256
            progress.advance()
    return digests


def write_index(folder: Path, shards: dict[str, list[str]], total_size: int, total_parameters: int) -> None:
    """model.safetensors.index.json as transformers writes it (only for more than one shard)."""
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
             "weight_map": {name: file for file, names in shards.items() for name in names}}
    with open(folder / INDEX_NAME, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
