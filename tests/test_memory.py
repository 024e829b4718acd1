"""The memory a command may take: the machine's free memory, bounded by the process's cgroups
(containers, Slurm and Kubernetes jobs), read from cgroup trees written on disk as the kernel lays
them out."""

from __future__ import annotations

from functools import partial
from pathlib import Path

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
    # a Slurm job limited to 8 GiB, using 3 GiB of which 1 GiB is inactive file cache; its step has no limit
    _cgroup(mount / "job", str(8 * GIB), 3 * GIB, f"anon 123\ninactive_file {GIB}\nactive_file 5\n")
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
    _cgroup(mount / "memory" / "docker" / "abc", str(4 * GIB), GIB, f"cache 7\ntotal_inactive_file {GIB // 2}\n", v1=True)
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
