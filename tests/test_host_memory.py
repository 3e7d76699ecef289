"""The host memory the default plans use: MemAvailable, or less under a cgroup's memory limit (a container's, a
Kubernetes pod's, a Slurm job's), whose room /proc/meminfo does not show."""

from __future__ import annotations

import pytest
import torch
from conftest import shaped_shard_dir

from hf_layerstream import engine
from hf_layerstream.engine import available_host_memory, cgroup_memory_room

GiB = 2**30


def _tree(tmp_path, cgroup: str, mounts: list[str], files: dict[str, str]):
    """/proc/self/cgroup, /proc/self/mountinfo and the cgroup files, as paths under `tmp_path` ("{root}" in `mounts`
    is `tmp_path`)."""
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text("".join(line.format(root=tmp_path) + "\n" for line in mounts))
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


PROC = "22 28 0:5 / /proc rw,nosuid - proc proc rw"


def test_a_containers_v2_limit_leaves_its_room_less_the_working_set(tmp_path):
    """cgroup v2 in a cgroup namespace (Docker's default): the mount shows the container's own cgroup."""
    paths = _tree(
        tmp_path,
        "0::/\n",
        [PROC, "31 23 0:26 / {root}/fs rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate"],
        {
            "fs/memory.max": f"{8 * GiB}\n",
            "fs/memory.high": "max\n",
            "fs/memory.current": f"{3 * GiB}\n",
            "fs/memory.stat": f"anon {2 * GiB}\nfile {GiB}\nactive_file 0\ninactive_file {GiB}\n",
        },
    )
    assert cgroup_memory_room(*paths) == 6 * GiB  # 8 - (3 - 1 reclaimable)


def test_the_tightest_limit_up_the_v2_hierarchy_wins(tmp_path):
    """No namespace: /proc/self/cgroup names the path from the hierarchy's root; the pod's limit is above the
    container's cgroup (which has none), and its memory.high is below its memory.max."""
    pod = "fs/kubepods/pod1"
    paths = _tree(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        ["31 23 0:26 / {root}/fs rw - cgroup2 cgroup2 rw"],
        {
            f"{pod}/c1/memory.max": "max\n",
            f"{pod}/c1/memory.current": f"{GiB}\n",
            f"{pod}/memory.max": f"{6 * GiB}\n",
            f"{pod}/memory.high": f"{4 * GiB}\n",
            f"{pod}/memory.current": f"{3 * GiB}\n",
            "fs/kubepods/memory.max": f"{100 * GiB}\n",
            "fs/kubepods/memory.current": f"{10 * GiB}\n",
            "fs/memory.current": f"{50 * GiB}\n",  # (the root has no memory.max)
        },
    )
    assert cgroup_memory_room(*paths) == GiB
    # over its limit (page cache not yet reclaimed shows as inactive files, counted as room): never below 0
    (tmp_path / pod / "memory.current").write_text(f"{5 * GiB}\n")
    assert cgroup_memory_room(*paths) == 0


def test_a_v1_memory_controller_uses_its_hierarchical_limit(tmp_path):
    """cgroup v1 (Slurm, older Docker): the controller is found by its mount's options, the cgroup by its line in
    /proc/self/cgroup; a mount showing that cgroup as its root is the cgroup itself."""
    mounts = [
        "32 31 0:29 / {root}/cpu rw - cgroup cgroup rw,cpu",
        "35 31 0:32 /docker/abc {root}/memory rw,relatime - cgroup cgroup rw,memory",
    ]
    stat = f"cache {GiB}\nhierarchical_memory_limit {2 * GiB}\ntotal_inactive_file {GiB // 2}\n"
    files = {"memory/memory.stat": stat, "memory/memory.usage_in_bytes": f"{3 * GiB // 2}\n"}
    paths = _tree(tmp_path, "5:cpu:/\n4:memory:/docker/abc\n0::/\n", mounts, files)
    assert cgroup_memory_room(*paths) == GiB  # 2 - (1.5 - 0.5)
    # "no limit" (the largest page count, as this machine shows)
    (tmp_path / "memory/memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert cgroup_memory_room(*paths) is None


@pytest.mark.parametrize(
    "cgroup, mount",
    [
        ("0::/\n", "31 23 0:26 / {root}/fs rw - cgroup2 cgroup2 rw"),  # the host's root cgroup: no memory.max
        ("0::/user.slice\n", "31 23 0:26 / {root}/missing rw - cgroup2 cgroup2 rw"),  # files not there
        ("4:memory:/job\n", "31 23 0:26 / {root}/fs rw - tmpfs tmpfs rw"),  # no memory controller mounted
        ("garbage\n", "not a mountinfo line"),
    ],
)
def test_no_limit_or_nothing_readable_is_none(tmp_path, cgroup, mount):
    paths = _tree(tmp_path, cgroup, [mount], {"fs/memory.current": "123\n", "fs/cgroup.procs": "1\n"})
    assert cgroup_memory_room(*paths) is None
    assert cgroup_memory_room(str(tmp_path / "nope"), paths[1]) is None


def test_the_available_memory_is_the_less_of_meminfo_and_the_cgroups_room(monkeypatch):
    monkeypatch.setattr(engine, "memory_reading", lambda: (20 * GiB, "MemAvailable"))
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: 5 * GiB)
    assert available_host_memory() == 5 * GiB
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: 30 * GiB)
    assert available_host_memory() == 20 * GiB
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: None)
    assert available_host_memory() == 20 * GiB


def test_where_no_meminfo_can_be_read_the_available_memory_says_how_it_was_told(tmp_path, monkeypatch, caplog):
    """Without /proc/meminfo (macOS, a sandbox without /proc): psutil where installed, else sysconf's free pages
    (`"free memory"`), else 4 GiB assumed, with one warning naming `max_memory`; never a negative or zero
    reading (sysconf can answer -1)."""
    import sys

    monkeypatch.setattr(engine, "_MEMINFO", str(tmp_path / "no-meminfo"))
    assert engine.memory_reading()[1] in ("psutil", "free memory")
    monkeypatch.setitem(sys.modules, "psutil", None)  # (not installed: its import raises ImportError)
    free, told = engine.memory_reading()
    assert told == "free memory" and free > 0
    monkeypatch.setattr(engine.os, "sysconf", lambda name: -1)
    monkeypatch.setattr(engine, "_warned_assumed", False)
    with caplog.at_level("WARNING", logger="hf_layerstream.engine"):
        assert engine.memory_reading() == (4 * GiB, "assumed")
        assert engine.available_host_memory() <= 4 * GiB
    warned = [r.getMessage() for r in caplog.records if "Could not read the memory available" in r.getMessage()]
    assert len(warned) == 1 and "max_memory={'cpu': ...}" in warned[0]
    assert engine.memory_reading() == (4 * GiB, "assumed")  # (warned once)
    assert len([r for r in caplog.records if "Could not read the memory available" in r.getMessage()]) == 1


def test_this_machines_reading_is_sane():
    """Whatever the machine (a container or not): some memory, and no more than the machine has."""
    total = engine.os.sysconf("SC_PHYS_PAGES") * engine.os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_host_memory() <= total
    room = cgroup_memory_room()
    assert room is None or 0 <= room


def test_a_cgroup_limit_lowers_the_default_cpu_plan(monkeypatch):
    """On a host with far more memory than the container's limit, the default plan keeps layers by the limit: with
    MemAvailable alone it would keep half of 80 GiB of layers in a 16 GiB container."""
    shards = shaped_shard_dir(80, GiB, GiB)
    monkeypatch.setattr(engine, "memory_reading", lambda: (80 * GiB, "MemAvailable"))
    room = {"bytes": None}
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: room["bytes"])

    def kept():
        plan = engine.plan_residency(shards, torch.device("cpu"), prefetch=1)
        assert plan.budgets["cpu"] == int(engine.DEFAULT_HOST_SHARE * (room["bytes"] or 80 * GiB))
        return len(plan.device_layers)

    assert kept() == 37  # 40 GiB: the resident part, 2 layers in flight, 37 kept
    room["bytes"] = 16 * GiB
    assert kept() == 5  # 8 GiB
    room["bytes"] = 2 * GiB
    assert kept() == 0
