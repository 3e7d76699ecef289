"""Crash safety of `split_checkpoint` and of the loader: SIGKILL, full disks, I/O errors, two writers at once.

The invariant behind every test: whatever happened, running the same split again completes it, re-reads from the
source only the units that are still missing, and gives a directory byte-identical to an uninterrupted split,
whose streamed logits equal `from_pretrained`'s exactly (fp32, `torch.equal`). The source is never modified.

Kills are real: the split runs in a separate process (forked from a helper `python -c` interpreter that imported
torch and transformers once, so each kill costs milliseconds, not an import) with a slowed-down writer, and the
test sends it SIGKILL after a random delay. Run the long campaign with `pytest -m slow tests/test_crash_safety.py`.
"""

from __future__ import annotations

import builtins
import collections
import errno
import gc
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import _models
import pytest
import torch
from conftest import returns_within, run_python, streamed_model, tqdm_lock_held_elsewhere

from hf_layerstream import LayerLoadError, ShardDirectory, ShardDirError, disable_layer_streaming, split_checkpoint
from hf_layerstream import _safetensors as st_mod
from hf_layerstream import split as split_mod

logger = logging.getLogger(__name__)

STREAM_ALL = {"max_memory": {"cpu": 0}, "prefetch": 1}  # every layer read from disk at every forward
IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 7]])
LEDGER: dict[str, int] = {
    "kills_attempted": 0,
    "kills_landed": 0,
    "kills_survived": 0,
    "faults_injected": 0,
    "faults_survived": 0,
    "data_lost": 0,
}

# --- helpers -------------------------------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `path` (symlinks not followed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tree_digest(path: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree(path).items()}


def assert_same_tree(got: Path, expected: Path) -> None:
    a, b = tree(got), tree(expected)
    assert sorted(a) == sorted(b), f"files differ: {sorted(set(a) ^ set(b))}"
    different = [k for k in a if a[k] != b[k]]
    assert not different, f"contents differ: {different}"


def no_partial_files(shards: Path, *, killed: bool = False) -> None:
    """Every file under its final name is complete: unit files parse and match any record of them.

    A SIGKILLed writer cannot clean up: it may leave a hidden `.<name>.tmp-<pid>` file (never taken for a unit; the
    next split removes it). Any other failure must leave none.
    """
    names = [p.name for p in shards.rglob("*")]
    tmp = [n for n in names if st_mod.TMP_MARKER in n]
    assert not tmp or (killed and all(n.startswith(".") for n in tmp)), names
    recorded = {}
    progress = shards / split_mod.PROGRESS_NAME
    if progress.exists():
        recorded = {u["file"]: u for u in json.loads(progress.read_text())["units"]}
    for p in [shards / "resident.safetensors", *sorted((shards / "layers").glob("*.safetensors"))]:
        if p.exists():
            header = st_mod.read_header(p)  # complete: offsets fit the file
            entry = recorded.get(str(p.relative_to(shards)))
            if entry is not None:
                assert entry["size"] == header.file_size
                assert entry["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


class CountingLoads:
    """Counts source tensor loads (`_Source.load`) and attributes them to the unit written next."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        self.by_unit: dict[str, list[str]] = {}
        real_load, real_write = split_mod._Source.load, split_mod._write_unit
        pending: list[str] = []

        def load(src, key):
            self.keys.append(key)
            pending.append(key)
            return real_load(src, key)

        def write(shard_dir, unit, *args, **kwargs):
            self.by_unit[unit] = list(pending)
            pending.clear()
            return real_write(shard_dir, unit, *args, **kwargs)

        monkeypatch.setattr(split_mod._Source, "load", load)
        monkeypatch.setattr(split_mod, "_write_unit", write)


@pytest.fixture(scope="module")
def llama(server, tmp_path_factory):
    """A 4-layer fp32 llama checkpoint, its uninterrupted split, the source keys of each unit, the reference model."""
    root = tmp_path_factory.mktemp("crash")
    ckpt = _models.save_tiny_checkpoint("llama", root / "ckpt", num_hidden_layers=4)
    mp = pytest.MonkeyPatch()
    counter = CountingLoads(mp)
    try:
        reference = split_checkpoint(ckpt, root / "reference", progress=False)
    finally:
        mp.undo()
    ref_model = _models.load_reference(ckpt)
    with torch.no_grad():
        logits = ref_model(IDS).logits
    server.warm(ckpt, root / "warm")
    return {
        "ckpt": ckpt,
        "reference": reference,
        "keys_by_unit": counter.by_unit,
        "logits": logits,
        "source_digest": tree_digest(ckpt),
    }


def check_exact(llama, shards: Path) -> None:
    """The directory is byte-identical to the uninterrupted split and streams the reference logits exactly."""
    assert_same_tree(shards, llama["reference"])
    assert ShardDirectory(shards).verify() == []
    model = streamed_model(llama["ckpt"], shards, **STREAM_ALL)
    try:
        with torch.no_grad():
            got = model(IDS).logits
    finally:
        disable_layer_streaming(model)  # stops the loader thread
    assert got.dtype == torch.float32 and torch.equal(got, llama["logits"])
    assert tree_digest(llama["ckpt"]) == llama["source_digest"], "the source checkpoint was modified"


def final_unit_files(shards: Path) -> set[str]:
    units = set()
    if (shards / "resident.safetensors").exists():
        units.add("resident")
    for p in (shards / "layers").glob("*.safetensors") if (shards / "layers").is_dir() else ():
        units.add(f"layers.{int(p.stem)}")
    return units


def resume_and_check(llama, shards: Path, monkeypatch, *, damaged: tuple[str, ...] = ()) -> list[str]:
    """Run the split again in-process; assert it reads from the source exactly the units still missing (or damaged)."""
    present = final_unit_files(shards) - set(damaged)
    finished = (shards / "manifest.json").exists() and not damaged
    with monkeypatch.context() as m:
        counter = CountingLoads(m)
        split_checkpoint(llama["ckpt"], shards, progress=False)
    expected = (
        [] if finished else sorted(k for u, keys in llama["keys_by_unit"].items() if u not in present for k in keys)
    )
    assert sorted(counter.keys) == expected, "the resumed split re-read tensors it had already written"
    check_exact(llama, shards)
    return counter.keys


# --- the fork server: a python -c interpreter that imported everything once and forks one child per split ---------

_SERVER = r"""
import json, os, sys, time, traceback
sys.path[:0] = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)  # before any op: no OpenMP pool in the process that forks
from hf_layerstream import split_checkpoint, _safetensors
print("ready", flush=True)
for line in sys.stdin:
    command, _, arg = line.partition(" ")
    if command == "warm":  # one split here first: transformers' lazy imports then happen once, not in every child
        split_checkpoint(*json.loads(arg), progress=False)
        print(0, flush=True)
        continue
    if command == "reap":  # reap only when told: until then the pid cannot be reused, so a late kill hits nothing
        _, status = os.waitpid(int(arg), 0)
        print(status, flush=True)
        continue
    job = json.loads(arg)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sys.stdin.close()
            slow, real_write_all, real_fsync = job["slow"], _safetensors._write_all, os.fsync
            def slow_write_all(fd, data):  # a slow disk: each file written in 4 pieces, then a slow fsync
                step = max(1, len(data) // 4)
                for i in range(0, len(data), step):
                    real_write_all(fd, data[i : i + step])
                    time.sleep(slow)
            def slow_fsync(fd):
                time.sleep(slow)
                return real_fsync(fd)
            _safetensors._write_all = slow_write_all
            os.fsync = slow_fsync
            split_checkpoint(job["source"], job["shards"], progress=False, wait=job.get("wait", False))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    print(pid, flush=True)
"""


class ForkServer:
    def __init__(self):
        paths = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(paths)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.ready = False  # imports run in the background while the test prepares its checkpoints

    def _command(self, line: str) -> int:
        if not self.ready:
            ready = self.proc.stdout.readline().strip()
            if ready != "ready":
                raise RuntimeError(f"fork server failed to start: {ready!r}")
            self.ready = True
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def warm(self, source: Path, shards: Path) -> None:
        self._command("warm " + json.dumps([str(source), str(shards)]))

    def start(self, source: Path, shards: Path, *, slow: float, wait: bool = False) -> int:
        job = {"source": str(source), "shards": str(shards), "slow": slow, "wait": wait}
        return self._command("start " + json.dumps(job))

    def finish(self, pid: int, *, kill_after: float | None = None, timeout: float = 120) -> int:
        """Optionally SIGKILL child `pid` after `kill_after` seconds; return its wait status once it is gone."""
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # our own child (not reaped yet: a zombie at worst, never another process)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"split child {pid} hung")
            time.sleep(0.01)
        return self._command(f"reap {pid}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


SLOW = 0.004  # seconds per piece written and per fsync: a full split of the 4-layer model then takes ~0.6 s


@pytest.fixture(scope="module")
def split_duration(server, llama, tmp_path_factory):
    """How long an uninterrupted, slowed-down split takes in a child: the range the random kill delays cover."""
    target = tmp_path_factory.mktemp("calibrate") / "shards"
    t0 = time.monotonic()
    status = server.finish(server.start(llama["ckpt"], target, slow=SLOW))
    duration = time.monotonic() - t0
    logger.info("a slowed-down split takes %.2f s in a child", duration)
    assert status == 0
    assert_same_tree(target, llama["reference"])
    return duration


def kill_campaign(server, llama, root: Path, monkeypatch, *, kills: int, seed: int, duration: float) -> None:
    """`kills` scenarios: kill a split 1-3 times at random moments, then resume it and check the result."""
    rng = random.Random(seed)
    for n in range(kills):
        shards = root / f"run{n}"
        for _ in range(rng.randint(1, 3)):
            delay = rng.uniform(0, duration * 1.05)
            pid = server.start(llama["ckpt"], shards, slow=SLOW)
            status = server.finish(pid, kill_after=delay)
            LEDGER["kills_attempted"] += 1
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                LEDGER["kills_landed"] += 1
            else:
                assert status == 0, f"the split child failed on its own (status {status})"
            if shards.exists():
                no_partial_files(shards, killed=True)
                if not (shards / "manifest.json").exists():
                    with pytest.raises(ShardDirError):
                        ShardDirectory(shards)  # an unfinished split never looks like a valid directory
        try:
            resume_and_check(llama, shards, monkeypatch)
        except AssertionError:
            LEDGER["data_lost"] += 1
            raise
        LEDGER["kills_survived"] += 1
    print(
        f"\nkill campaign (seed {seed}): {kills} scenarios, kills landed {LEDGER['kills_landed']} / attempted "
        f"{LEDGER['kills_attempted']}, scenarios resumed exactly {LEDGER['kills_survived']}, data lost {LEDGER['data_lost']}"
    )


# --- kills -----------------------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume(server, llama, split_duration, tmp_path, monkeypatch):
    kill_campaign(server, llama, tmp_path, monkeypatch, kills=4, seed=1234, duration=split_duration)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_campaign(server, llama, split_duration, tmp_path, monkeypatch):
    seed = int(os.environ.get("HF_LAYERSTREAM_KILL_SEED", "20240611"))
    kill_campaign(server, llama, tmp_path, monkeypatch, kills=24, seed=seed, duration=split_duration)


def test_two_splits_into_one_directory(server, llama, split_duration, tmp_path):
    shards = tmp_path / "shards"
    first = server.start(llama["ckpt"], shards, slow=SLOW * 3)
    deadline = time.monotonic() + 60
    # the first split holds the lock once it writes anything
    while not any(
        st_mod.TMP_MARKER in p.name or p.name == ".progress.json" for p in shards.rglob("*") if shards.exists()
    ):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(ShardDirError, match=r"Another process is splitting into .*wait=True"):
        split_checkpoint(llama["ckpt"], shards, progress=False)
    second = server.start(llama["ckpt"], shards, slow=SLOW, wait=True)  # another process, waiting its turn
    t0 = time.monotonic()
    try:  # blocks until the first is done; bounded, so a child that hangs holding the lock fails the test
        returns_within(120, split_checkpoint, llama["ckpt"], shards, progress=False, wait=True)
    except AssertionError:
        for pid in (first, second):
            os.kill(pid, signal.SIGKILL)
        raise
    assert (shards / "manifest.json").exists() and time.monotonic() - t0 > 0.05
    assert server.finish(first) == 0 and server.finish(second) == 0
    check_exact(llama, shards)


def test_split_without_a_bar_never_takes_tqdm_lock(llama, tmp_path):
    """A split with `progress=False` must not touch tqdm's global lock (even a disabled bar takes it).

    Its multiprocessing half is shared by every process forked from the one that created it: CI once hung for 90
    minutes in `test_two_splits_into_one_directory` after the kill campaign had SIGKILLed a split child holding it,
    so every later child blocked in `tqdm()` while holding the split's directory lock.
    """
    with tqdm_lock_held_elsewhere():
        shards = returns_within(60, split_checkpoint, llama["ckpt"], tmp_path / "shards", progress=False)
    assert_same_tree(shards, llama["reference"])


# --- full disk, I/O errors ----------------------------------------------------------------------------------------


def _fail_on(monkeypatch, what: str, when: str, err: int):
    """Make the `what` step ("write", "fsync", "replace", "fsync_dir") of the write of a file named `when` fail."""
    real = {"write": st_mod._write_all, "fsync": os.fsync, "replace": os.replace, "fsync_dir": os.fsync}
    state = {"current": None, "fired": False}

    def naming(real_atomic):  # the file being written, while it is written
        def atomic(path, *args, **kwargs):
            state["current"] = Path(path).name
            try:
                return real_atomic(path, *args, **kwargs)
            finally:
                state["current"] = None

        return atomic

    def should_fire():
        if state["current"] == when and not state["fired"]:
            state["fired"] = True
            return True
        return False

    def write_all(fd, data):
        if should_fire():
            real["write"](fd, data[: len(data) // 2])  # half of it made it to disk
            raise OSError(err, os.strerror(err))
        return real["write"](fd, data)

    fsync_calls = {"n": 0}

    def fsync(fd):
        if what == "fsync" and should_fire():
            raise OSError(err, os.strerror(err))
        if what == "fsync_dir" and state["current"] == when and os.path.isdir(f"/proc/self/fd/{fd}"):
            if should_fire():
                raise OSError(err, os.strerror(err))
        fsync_calls["n"] += 1
        return real["fsync"](fd)

    def replace(a, b):
        if should_fire():
            raise OSError(err, os.strerror(err))
        return real["replace"](a, b)

    monkeypatch.setattr(split_mod, "atomic_write_bytes", naming(st_mod.atomic_write_bytes))
    monkeypatch.setattr(split_mod, "atomic_write_safetensors", naming(st_mod.atomic_write_safetensors))
    if what == "write":
        monkeypatch.setattr(st_mod, "_write_all", write_all)
    elif what in ("fsync", "fsync_dir"):
        monkeypatch.setattr(os, "fsync", fsync)
    elif what == "replace":
        monkeypatch.setattr(os, "replace", replace)
    return state


@pytest.mark.parametrize(
    "what, when, err",
    [
        ("write", "00001.safetensors", errno.ENOSPC),
        ("write", "resident.safetensors", errno.ENOSPC),
        ("write", ".progress.json", errno.ENOSPC),
        ("write", "manifest.json", errno.ENOSPC),
        ("fsync", "00002.safetensors", errno.EIO),
        ("replace", "00000.safetensors", errno.EIO),
        ("fsync_dir", "00003.safetensors", errno.EIO),
        ("write", "config.json", errno.EIO),
        ("write", "tokenizer.json", errno.ENOSPC),
        ("write", "manifest.json", errno.EFBIG),
        ("write", ".progress.json", errno.EACCES),
        ("write", "00001.safetensors", errno.EROFS),
    ],
)
def test_disk_full_or_io_error_mid_split_then_rerun(llama, tmp_path, monkeypatch, what, when, err):
    """Each error names the file, the free space and the fix (the first progress record, the side files, config and
    manifest, and any EFBIG, raised a bare "[Errno 28] No space left on device"; a folder this user cannot write
    named a temporary file only, "[Errno 13] Permission denied: '...progress.json.tmp-25130'"). A full disk names
    the space a process streaming from the directory holds: the preflight counts a file the split replaces as freed,
    and it is not while a model maps it."""
    shards = tmp_path / "shards"
    LEDGER["faults_injected"] += 1
    with monkeypatch.context() as m:
        state = _fail_on(m, what, when, err)
        with pytest.raises(OSError) as info:
            split_checkpoint(llama["ckpt"], shards, progress=False)
    assert state["fired"] and info.value.errno == err
    assert f"{when} into {shards} failed" in str(info.value) and "free)" in str(info.value)
    assert "run the same split again" in str(info.value)  # names the cause and the fix
    assert ("keeps the old files until `disable_layer_streaming`" in str(info.value)) is (err == errno.ENOSPC)
    assert ("cannot be written: make it writable" in str(info.value)) is (err in (errno.EACCES, errno.EROFS))
    no_partial_files(shards)
    assert not (shards / "manifest.json").exists()
    # an interrupted directory never looks valid, and says how to finish it once it recorded anything
    unfinished = "unfinished split" if (shards / split_mod.PROGRESS_NAME).exists() else "has no manifest.json"
    with pytest.raises(ShardDirError, match=unfinished):
        ShardDirectory(shards)
    resume_and_check(llama, shards, monkeypatch)
    LEDGER["faults_survived"] += 1


@pytest.mark.parametrize("options", [{}, {"double_quant": True}], ids=["4bit", "4bit-dq"])
def test_a_quantized_split_killed_after_a_unit_is_in_place_resumes_byte_identical(
    llama, tmp_path, monkeypatch, options
):
    """Killed right after a unit file took its final name, before the progress record named it: the rerun adopts it
    from its own metadata. Of a quantized split, the manifest then held that unit's codec settings in sorted key order
    (as the metadata holds them), not as an uninterrupted split writes them: not byte-identical."""
    reference = split_checkpoint(llama["ckpt"], tmp_path / "reference", compression="4bit", progress=False, **options)
    shards = tmp_path / "shards"
    replace = os.replace

    def killed_after(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if str(dst).endswith("00000.safetensors"):
            raise KeyboardInterrupt  # (what a SIGKILL leaves: the file in place, not yet recorded)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_after)
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint(llama["ckpt"], shards, compression="4bit", progress=False, **options)
    assert (shards / "layers" / "00000.safetensors").exists() and not (shards / "manifest.json").exists()
    split_checkpoint(llama["ckpt"], shards, compression="4bit", progress=False, **options)
    assert_same_tree(shards, reference)


def test_ctrl_c_in_torchs_c_code_reading_a_source_tensor_is_a_keyboard_interrupt(llama, tmp_path, monkeypatch):
    """A Ctrl-C while torch's C code ran inside safetensors' `get_tensor` (its KeyboardInterrupt cleared there, the
    call failing with "ValueError: could not determine the shape of object type 'torch.storage.UntypedStorage'") was
    raised as a ShardFileError saying the source file was damaged, the Ctrl-C lost: it is the KeyboardInterrupt, with
    nothing partial left, and the same split resumes. The handler in place is put back after each read."""
    shards = tmp_path / "shards"
    import safetensors

    real_open = safetensors.safe_open
    handler = signal.getsignal(signal.SIGINT)
    fired = []

    class Interrupted:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, key):
            if "layers.2." in key and not fired:
                fired.append(key)
                try:  # what torch's C code does: a call back into Python meets the Ctrl-C, and it clears the error
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
            return self.handle.get_tensor(key)

    with monkeypatch.context() as m:
        m.setattr(safetensors, "safe_open", lambda *a, **k: Interrupted(real_open(*a, **k)))
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint(llama["ckpt"], shards, progress=False)
    assert fired and signal.getsignal(signal.SIGINT) is handler
    no_partial_files(shards)
    assert not (shards / "manifest.json").exists()
    resume_and_check(llama, shards, monkeypatch)
    check_exact(llama, shards)


def test_ctrl_c_at_any_moment_of_reading_source_tensors_is_a_keyboard_interrupt(llama):
    """Ctrl-C at random moments of reading the source's tensors (safetensors' `get_tensor`, through torch's C code,
    which clears a KeyboardInterrupt met there and fails otherwise: 4 in 10 were a ShardFileError): each is the
    KeyboardInterrupt, none a ShardFileError, and the SIGINT handler in place is the same after each."""
    src = split_mod._Source(llama["ckpt"], revision=None, token=None, cache_dir=None)
    keys = sorted(src.keys)
    handler = signal.getsignal(signal.SIGINT)
    previous = signal.signal(
        signal.SIGALRM, lambda signum, frame: signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)
    )
    outcomes = []
    try:
        for trial in range(200):
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.00005 + (trial % 40) * 0.00002)  # (a Ctrl-C, to the handler)
                for _ in range(20):
                    for key in keys:
                        src.load(key)
                time.sleep(1)
                outcomes.append("none")
            except BaseException as e:  # noqa: BLE001 - what is raised is the result
                outcomes.append(type(e).__name__)
            assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert set(outcomes) == {"KeyboardInterrupt"}, collections.Counter(outcomes)


@pytest.mark.parametrize(("compression", "dtype"), [("4bit", "bfloat16"), ("8bit", "float16")])
def test_ctrl_c_at_any_moment_of_casting_quantizing_and_writing_units_is_a_keyboard_interrupt(
    tmp_path, monkeypatch, compression, dtype
):
    """A real SIGINT at random moments of the units' work (the `dtype` cast, bitsandbytes' quantization, whose CPU
    kernels are Python that torch's dispatcher calls, the file's write, fsync and rename), each run resumed by the
    next until one finishes: each is the KeyboardInterrupt (those errors are not wrapped as a damaged source, as a
    read's are, and none was another error), the SIGINT handler in place is the same after each, no temporary file is
    left and a file under its final name is complete; the split finished so is byte-identical to an uninterrupted one.
    (Layers wider than the `llama` fixture's: the cast and the quantization take most of a unit's time.)"""
    config = _models.make_config("llama", num_hidden_layers=2, hidden_size=256, intermediate_size=1024)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt")
    options = {"compression": compression, "dtype": dtype, "progress": False}
    reference = split_checkpoint(ckpt, tmp_path / "reference", **options)
    real_convert, real_write = split_mod.convert_unit, split_mod._write_unit
    armed: list[float] = []  # (the delay of the run's Ctrl-C, from its first unit's conversion; none: not armed)
    timers, started, written = [], [], []

    def convert_unit(*args, **kwargs):
        if not started:
            started.append(time.perf_counter())
            if armed:
                timer = threading.Timer(armed[0], signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
                timers.append(timer)
                timer.start()
        return real_convert(*args, **kwargs)

    def write_unit(*args, **kwargs):
        entry = real_write(*args, **kwargs)
        written.append(time.perf_counter())
        return entry

    monkeypatch.setattr(split_mod, "convert_unit", convert_unit)
    monkeypatch.setattr(split_mod, "_write_unit", write_unit)
    for timed in ("timed", "timed-again"):  # (the second: what a first quantization sets up is set up)
        started.clear()
        split_checkpoint(ckpt, tmp_path / timed, **options)
    span = written[-1] - started[0]  # (from the first unit's conversion to the last unit's file in place)
    handler = signal.getsignal(signal.SIGINT)
    outcomes = []
    try:
        for cycle in range(4):
            shards = tmp_path / f"shards-{cycle}"
            for _run in range(40):
                started.clear()
                armed[:] = [random.uniform(0, span)]
                try:
                    split_checkpoint(ckpt, shards, **options)
                    outcomes.append("none")
                except BaseException as e:  # noqa: BLE001 - what is raised is the result
                    outcomes.append(type(e).__name__)
                finally:
                    _let_go(timers[-1])
                assert signal.getsignal(signal.SIGINT) is handler
                assert not [p.name for p in shards.rglob("*") if st_mod.TMP_MARKER in p.name]
                no_partial_files(shards)
                if outcomes[-1] == "none":
                    break
            armed.clear()
            split_checkpoint(ckpt, shards, **options)  # (finished, or the last run interrupted)
            assert_same_tree(shards, reference)
    finally:
        armed.clear()
        for timer in timers:
            _let_go(timer)
    assert set(outcomes) <= {"KeyboardInterrupt", "none"}, collections.Counter(outcomes)
    assert "KeyboardInterrupt" in outcomes, collections.Counter(outcomes)


def test_ctrl_c_halfway_through_writing_a_unit_file_leaves_no_temporary_file(llama, tmp_path, monkeypatch):
    """A Ctrl-C (a real SIGINT) once half of a tensor's bytes are in a unit's temporary file: the KeyboardInterrupt,
    the temporary file removed (the faults injected above are OSErrors: a cleanup of those only passed them), no file
    under the unit's name, and the same split resumes, reading only the units still missing."""
    shards = tmp_path / "shards"
    real_atomic, real_write_all = split_mod.atomic_write_safetensors, st_mod._write_all
    writing, fired = [], []

    def atomic_write_safetensors(path, *args, **kwargs):
        writing[:] = [Path(path).name]
        return real_atomic(path, *args, **kwargs)

    def write_all(fd, data):
        if writing == ["00002.safetensors"] and len(data) > 1024 and not fired:  # (a tensor's bytes, not the header)
            real_write_all(fd, data[: len(data) // 2])
            fired.append(len(data))
            signal.raise_signal(signal.SIGINT)
        real_write_all(fd, data)

    with monkeypatch.context() as m:
        m.setattr(split_mod, "atomic_write_safetensors", atomic_write_safetensors)
        m.setattr(st_mod, "_write_all", write_all)
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint(llama["ckpt"], shards, progress=False)
    assert fired
    assert not [p.name for p in shards.rglob("*") if st_mod.TMP_MARKER in p.name]
    assert not (shards / "layers" / "00002.safetensors").exists() and not (shards / "manifest.json").exists()
    no_partial_files(shards)
    resume_and_check(llama, shards, monkeypatch)


def _let_go(timer: threading.Timer) -> None:
    """Stop `timer`, or let the SIGINT it sent go by (a run it did not interrupt, one that failed otherwise: the
    KeyboardInterrupt is not to end the test session)."""
    timer.cancel()
    try:
        timer.join()
        time.sleep(0.01)  # (a SIGINT sent as the timer was stopped is raised here)
    except KeyboardInterrupt:
        pass


def test_disk_space_preflight_refuses_before_writing(llama, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    need = sum(p.stat().st_size for p in llama["reference"].rglob("*.safetensors"))
    monkeypatch.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": need // 2})())
    with pytest.raises(OSError, match="Not enough disk space") as info:
        split_checkpoint(llama["ckpt"], shards, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert not list(shards.rglob("*.safetensors")) and not (shards / "manifest.json").exists()


def _free_bytes(monkeypatch, free: int) -> None:
    monkeypatch.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": free})())


def test_a_refused_overwrite_leaves_the_split_there_usable(llama, tmp_path, monkeypatch):
    """`overwrite=True` into a directory holding a split, refused for want of disk space: the split there is left as
    it was, and works (its manifest was deleted before the check, which said that nothing was written). Sizes under
    1 GiB are given in MiB (the message read "0.00 GiB more and 0.00 GiB are free")."""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    other = _models.save_tiny_checkpoint("llama", tmp_path / "other", num_hidden_layers=4, seed=1)
    _free_bytes(monkeypatch, 0)
    with pytest.raises(OSError, match=r"needs about [\d.]+ MiB more and 0 B are free") as info:
        split_checkpoint(other, shards, overwrite=True, progress=False)
    assert info.value.errno == errno.ENOSPC and "nothing was written" in str(info.value)
    check_exact(llama, shards)


def test_a_unit_copied_in_from_another_split_with_its_record_is_named_and_written_again(llama, tmp_path):
    """A layer file copied in from a split of the same architecture with other weights (another seed), its manifest
    entry with it (size, digests, tensors' records, all the other split's): opening, `verify` and the same split's
    re-run took it for this split's, and the model streamed the other model's layer (other logits, no error). Each unit
    file carries the digest of its split's options (model, source, dtype, compression), as the manifest does: a file
    carrying another is named at open (no read beyond its header), `verify` names it, and the same split run again
    writes it again. A manifest without that digest (a split made before it was recorded) opens as before."""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    other = _models.save_tiny_checkpoint("llama", tmp_path / "other", num_hidden_layers=4, seed=1)
    foreign = split_checkpoint(other, tmp_path / "foreign", progress=False)
    rel = "layers/00002.safetensors"
    shutil.copy(foreign / rel, shards / rel)
    mine = json.loads((shards / "manifest.json").read_text())
    theirs = next(u for u in json.loads((foreign / "manifest.json").read_text())["units"] if u["file"] == rel)
    mine["units"] = [theirs if u["file"] == rel else u for u in mine["units"]]
    (shards / "manifest.json").write_text(json.dumps(mine, indent=1))
    named = f"{shards / rel} was written by another split than the manifest records"
    with pytest.raises(ShardDirError, match=re.escape(named)):
        ShardDirectory(shards)
    with pytest.raises(ShardDirError, match=re.escape(named)):
        streamed_model(llama["ckpt"], shards, **STREAM_ALL)
    [problem] = ShardDirectory(shards, check_files=False).verify()
    assert problem.startswith(named), problem
    split_checkpoint(llama["ckpt"], shards, progress=False)
    check_exact(llama, shards)
    del mine["split_options"]  # (a split made before the digest was recorded: nothing to compare with)
    mine["units"] = json.loads((shards / "manifest.json").read_text())["units"]
    (shards / "manifest.json").write_text(json.dumps(mine, indent=1))
    assert ShardDirectory(shards).verify() == []


def test_a_resplit_in_place_needs_room_for_one_layer_not_a_second_copy(llama, tmp_path, monkeypatch):
    """Each unit file replaces the one of the same unit in place (written beside it, renamed over it): re-splitting
    into a directory that holds a split of the same size needs room for about one layer, not for a second copy of
    the whole split, which the check asked for before (and refused a split that fits)."""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    size = sum(p.stat().st_size for p in shards.rglob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards.rglob("*.safetensors"))
    assert largest < size // 4
    other = _models.save_tiny_checkpoint("llama", tmp_path / "other", num_hidden_layers=4, seed=1)
    _free_bytes(monkeypatch, size // 2 + 2**20 + 4096 * 5)  # (the check's allowance for the small files)
    split_checkpoint(other, shards, overwrite=True, progress=False)
    model = streamed_model(other, shards, **STREAM_ALL)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, _models.load_reference(other)(IDS).logits)


def test_a_resplit_while_a_model_streams_from_the_split_counts_its_files_as_kept(llama, tmp_path, monkeypatch):
    """A file the split replaces frees its space only once no process holds it: a model streaming from the directory
    maps its files. The preflight counted them as freed, the split ran out of disk part way and left the directory
    without a manifest (a new enable refused) until it was run again after that process stopped. It refuses up front
    now, naming the cause; once streaming is disabled, the same split fits."""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    size = sum(p.stat().st_size for p in shards.rglob("*.safetensors"))
    other = _models.save_tiny_checkpoint("llama", tmp_path / "other", num_hidden_layers=4, seed=1)
    model = streamed_model(llama["ckpt"], shards, **STREAM_ALL)
    with torch.no_grad():
        want = model(IDS).logits  # (every file mapped)
    _free_bytes(monkeypatch, size // 2 + 2**20 + 4096 * 5)  # (room for the re-split where the old files are freed)
    with pytest.raises(OSError, match=r"Not enough disk space") as info:
        split_checkpoint(other, shards, overwrite=True, progress=False)
    assert re.search(r"\d+ of the files it replaces are held open by a process", str(info.value)), str(info.value)
    assert "nothing was written" in str(info.value)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)  # (the split there is left as it was)
    disable_layer_streaming(model)
    del model
    gc.collect()
    split_checkpoint(other, shards, overwrite=True, progress=False)
    model = streamed_model(other, shards, **STREAM_ALL)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, _models.load_reference(other)(IDS).logits)
    disable_layer_streaming(model)


@pytest.mark.parametrize(
    "dtype, compression",
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.bfloat16, "4bit"),
        (torch.float32, "8bit"),
        (torch.bfloat16, "4bit-dq"),
    ],
)
def test_disk_space_estimate_uses_the_checkpoint_dtypes(tmp_path, monkeypatch, dtype, compression):
    """The estimate follows the stored dtypes (bf16: half of the fp32 skeleton's) and the codec's packed sizes."""
    if compression is not None:
        pytest.importorskip("bitsandbytes")
    ckpt = _models.save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", dtype=dtype)
    seen = {}
    real = split_mod._estimate_units_bytes

    def spy(*args, **kwargs):
        estimates = real(*args, **kwargs)
        seen["bytes"] = sum(estimates.values())
        return estimates

    monkeypatch.setattr(split_mod, "_estimate_units_bytes", spy)
    options = (
        {"compression": "4bit", "double_quant": True} if compression == "4bit-dq" else {"compression": compression}
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False, **options)
    actual = sum(p.stat().st_size for p in shards.rglob("*.safetensors"))
    # never under (the preflight would let the split run out of space), and close
    assert actual <= seen["bytes"] <= 1.08 * actual, (seen["bytes"], actual)


def test_disk_space_estimate_of_a_double_quantized_weight_counts_its_byte_scales():
    """A double-quantized weight's scales take a byte per block (and a float32 per 256 blocks), not a float32 per
    block: the estimate of a layer file holding a large one is its packed size, not plain 4-bit's (8% more)."""
    pytest.importorskip("bitsandbytes")
    from hf_layerstream.quant import QuantScheme, packed_nbytes, quantize_tensor, should_quantize

    name, shape = "model.layers.0.mlp.down_proj.weight", (1024, 2816)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for scheme in (QuantScheme(4), QuantScheme(4, double_quant=True)):
        estimate = split_mod._estimate_unit_bytes({name: (shape, torch.bfloat16)}, scheme, "layers.0", should_quantize)
        packed = packed_nbytes(quantize_tensor(weight, scheme)[0])
        assert packed < estimate <= packed + 2560, (scheme, estimate, packed)  # (+ the header's and record's bytes)


@pytest.mark.parametrize("options", [{}, {"double_quant": True}, {"bits": 8}], ids=["4bit", "4bit-dq", "8bit"])
def test_disk_space_estimate_counts_a_quantized_weights_header_from_its_parts(tmp_path, options):
    """A quantized weight's bytes in its unit file beyond its data, a header entry per part and its record (codec
    metadata included) in the unit record the header embeds, were counted as a flat 900 bytes double-quantized (600
    otherwise), about 100 more than they take: a unit of many such weights was overcounted by that much each. They are
    counted from the weight's parts and metadata: the estimate of a unit of 24 quantized weights (one a fused experts'
    3-D tensor) is never under the file written, and over it by less than the file's own allowance (1024 bytes: its
    length prefix, metadata and padding) and a few bytes a weight, whatever the scheme."""
    pytest.importorskip("bitsandbytes")
    from hf_layerstream.quant import QuantScheme, quantize_tensor, should_quantize

    scheme = QuantScheme(**{"bits": 4, **options})
    gen = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.0.mlp.experts.{i}.down_proj.weight": (64, 96 + 32 * i) for i in range(23)}
    shapes["model.layers.0.mlp.experts.gate_up_proj"] = (8, 256, 64)
    tensors = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}
    assert all(should_quantize(name, t, scheme) for name, t in tensors.items())
    estimate = split_mod._estimate_unit_bytes(
        {name: (shape, torch.bfloat16) for name, shape in shapes.items()}, scheme, "layers.0", should_quantize
    )
    entry = split_mod._write_unit(
        tmp_path,
        "layers.0",
        tensors,
        scheme,
        quantize_tensor,
        should_quantize,
        split_digest="0" * 64,
        load_dtype=torch.bfloat16,
    )
    # (a few bytes a weight more: each part's offsets counted at the file's longest)
    assert entry.size <= estimate < entry.size + 1024 + 8 * len(shapes), (estimate, entry.size)


def _with_big_tokenizer(ckpt: Path, dest: Path, size: int) -> Path:
    """A copy of `ckpt` whose tokenizer.json is `size` bytes (padded with spaces: the same JSON)."""
    shutil.copytree(ckpt, dest)
    text = json.dumps(json.loads((dest / "tokenizer.json").read_text()))
    (dest / "tokenizer.json").write_text(text[:-1] + " " * (size - len(text)) + "}")
    return dest


def test_disk_space_preflight_counts_the_side_files(llama, tmp_path, monkeypatch):
    """The preflight counted the unit files and 1 MiB for every other file: a tokenizer.json of 9–33 MB (Llama-3's,
    Gemma-3's) passed it, and the split ran out of space copying it after writing every layer. Its size counts."""
    units = sum(p.stat().st_size for p in llama["reference"].rglob("*.safetensors"))
    free = int(1.2 * units) + 4096 * 5 + 2 * 2**20
    _free_bytes(monkeypatch, free)
    big = _with_big_tokenizer(llama["ckpt"], tmp_path / "ckpt", 4 * 2**20)
    with pytest.raises(OSError, match="Not enough disk space") as info:
        split_checkpoint(big, tmp_path / "shards", progress=False)
    assert info.value.errno == errno.ENOSPC and not list((tmp_path / "shards").rglob("*.safetensors"))
    split_checkpoint(llama["ckpt"], tmp_path / "shards", progress=False)  # (the same room, a small tokenizer: fits)


def test_a_file_too_large_for_the_filesystem_is_named_with_the_fix(llama, tmp_path):
    """EFBIG (FAT32 holds 4 GiB per file; `ulimit -f`) was not among the errors that name the file and the fix, and
    the side files, config and manifest written after the layers were outside that handling: a bare "[Errno 27] File
    too large". Here a file size limit that every unit file fits but the tokenizer.json does not (a real one, set in
    a child process)."""
    big = _with_big_tokenizer(llama["ckpt"], tmp_path / "ckpt", 2 * 2**20)
    assert max(p.stat().st_size for p in llama["reference"].rglob("*")) < 2**20
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))\n"
        "from hf_layerstream import split_checkpoint\n"
        "try:\n"
        "    split_checkpoint(sys.argv[1], sys.argv[2], progress=False)\n"
        "except OSError as e:\n"
        "    print(e.errno, e)\n"
    )
    shards = tmp_path / "shards"
    out = run_python(code, big, shards)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.startswith(f"{errno.EFBIG} [Errno {errno.EFBIG}] Writing tokenizer.json into {shards} failed"), (
        message
    )
    assert "ulimit -f" in message and "free)" in message and "run the same split again" in message, message
    assert not (shards / "manifest.json").exists()


@pytest.mark.parametrize("step", ["progress record", "directory fsync"])
def test_an_error_in_the_last_steps_of_a_split_names_the_step_and_the_path(llama, tmp_path, monkeypatch, step):
    """Once the manifest is in place, the split removes its progress record and syncs the directory: an error there
    (EIO) raised the bare OSError ("[Errno 5] Input/output error", with the record's path at most), saying neither
    what failed nor that the split was otherwise complete. It names the step and the path, keeps the errno, and the
    same split run again checks the directory and finishes it."""
    shards = tmp_path / "shards"
    progress = shards / split_mod.PROGRESS_NAME
    real_unlink, real_fsync_dir = Path.unlink, split_mod.fsync_dir
    fired = []

    def unlink(path, *args, **kwargs):
        if path == progress and step == "progress record":
            fired.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *args, **kwargs)

    def fsync_dir(path):
        if step == "directory fsync" and (Path(path) / "manifest.json").exists():
            fired.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync_dir(path)

    LEDGER["faults_injected"] += 1
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        m.setattr(split_mod, "fsync_dir", fsync_dir)
        with pytest.raises(OSError) as info:
            split_checkpoint(llama["ckpt"], shards, progress=False)
    assert fired and info.value.errno == errno.EIO
    named = (
        f"removing the progress record {progress}" if step == "progress record" else f"syncing the directory {shards}"
    )
    message = str(info.value)
    assert f"The split into {shards} wrote every file and its manifest, but {named}" in message, message
    assert "Input/output error" in message and "run the same split again" in message, message
    assert ShardDirectory(shards).verify() == []  # (complete: the manifest is in place)
    assert progress.exists() == (step == "progress record")
    assert split_checkpoint(llama["ckpt"], shards, progress=False) == shards
    assert not progress.exists()
    check_exact(llama, shards)
    LEDGER["faults_survived"] += 1


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
def test_a_finished_split_is_checked_in_a_folder_this_user_cannot_write(llama, tmp_path, monkeypatch, caplog, err):
    """The lock was opened for writing (and created) before anything else: re-running a finished split on a read-only
    mount (EROFS), or in a group's folder whose `.lock` another user made 0644 (EACCES), failed instead of saying it
    has nothing to do; on the mount, so did removing the progress record a finished split does not have (Linux's
    unlink there fails with EROFS before it looks the name up). (As root, permissions are simulated at `os.open`,
    every open for writing under `shards`, and `os.unlink`.)"""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    real_open, real_unlink = os.open, os.unlink

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(str(shards)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        if str(path).startswith(str(shards)) and (err == errno.EROFS or os.path.lexists(path)):
            raise OSError(err, os.strerror(err), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        assert split_checkpoint(llama["ckpt"], shards, progress=False) == shards
    assert "already holds this split; nothing to do" in caplog.text
    monkeypatch.undo()
    check_exact(llama, shards)


@pytest.mark.parametrize("folder", ["read-only, finished", "lock refused, fresh"])
def test_a_split_where_no_lock_file_can_be_made_runs_without_one(llama, tmp_path, monkeypatch, folder):
    """Where `.lock` can be neither created nor opened (a read-only mount holding a finished split copied without its
    hidden files; a folder refusing that one file), the split runs without a lock: it checks the finished one, leaving
    it as it is, or writes one identical to the reference, instead of failing. (As root, the refusals are simulated at
    `os.open`.)"""
    import fcntl

    shards = tmp_path / "shards"
    lock = shards / split_mod.LOCK_NAME
    if folder == "read-only, finished":
        shutil.copytree(llama["reference"], shards)
        lock.unlink()
    before = tree(shards) if shards.exists() else None
    real_open, locked = os.open, []

    def open_(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and (
            str(path) == str(lock) or (folder == "read-only, finished" and str(path).startswith(str(shards)))
        ):
            raise OSError(errno.EROFS if folder == "read-only, finished" else errno.EPERM, "refused", str(path))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", open_)
        m.setattr(fcntl, "flock", lambda fd, operation: locked.append(fd))
        assert split_checkpoint(llama["ckpt"], shards, progress=False) == shards
    assert locked == [] and not lock.exists()
    if before is not None:
        assert tree(shards) == before
    expected = {k: v for k, v in tree(llama["reference"]).items() if k != split_mod.LOCK_NAME}
    assert tree(shards) == expected
    assert ShardDirectory(shards).verify() == []


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_file_locks_splits_unlocked_with_a_warning(llama, tmp_path, monkeypatch, caplog, err):
    """Some NFS, FUSE and SMB mounts refuse `flock` itself (ENOLCK, EOPNOTSUPP): the split runs without the lock,
    warning that concurrent splits are not prevented, and writes the reference's files; a lock held elsewhere is
    still refused."""
    import fcntl

    shards = tmp_path / "shards"

    def flock(fd, operation):
        raise OSError(err, os.strerror(err))

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="hf_layerstream.split"):
        m.setattr(fcntl, "flock", flock)
        assert split_checkpoint(llama["ckpt"], shards, progress=False) == shards
    assert "does not support file locks" in caplog.text and str(shards) in caplog.text
    assert tree(shards) == tree(llama["reference"])
    check_exact(llama, shards)

    def busy(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "held")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", busy)
        with pytest.raises(ShardDirError, match="Another process is splitting"):
            split_checkpoint(llama["ckpt"], shards, progress=False)


def test_a_group_shared_folder_is_repaired_under_the_lock_another_user_made(llama, tmp_path, monkeypatch):
    """A group's folder: `.lock` is another user's 0644 file, the folder is writable. The split opened the lock for
    writing and failed (EACCES); it takes the lock through a read-only descriptor and repairs the directory."""
    import fcntl

    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    (shards / ".lock").touch()
    os.truncate(shards / "layers" / "00001.safetensors", 1000)
    real_open, real_flock, locked = os.open, fcntl.flock, []

    def open_(path, flags, *args, **kwargs):
        if str(path) == str(shards / ".lock") and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def flock(fd, operation):
        locked.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_flock(fd, operation)

    with monkeypatch.context() as m:
        m.setattr(os, "open", open_)
        m.setattr(fcntl, "flock", flock)
        split_checkpoint(llama["ckpt"], shards, progress=False)
    assert str(shards / ".lock") in locked
    check_exact(llama, shards)


def test_files_are_created_as_the_umask_allows(llama, tmp_path):
    """Every file was created 0644 whatever the umask: in a group's folder (umask 002) the next user of the group
    could not take the lock or replace a file. They are created as `save_pretrained`'s are: 0666 less the umask."""
    old = os.umask(0o002)
    try:
        shards = split_checkpoint(llama["ckpt"], tmp_path / "shards", progress=False)
    finally:
        os.umask(old)
    for name in (
        ".lock",
        "manifest.json",
        "config.json",
        "tokenizer.json",
        "resident.safetensors",
        "layers/00000.safetensors",
    ):
        assert stat.S_IMODE((shards / name).stat().st_mode) == 0o664, name


def test_a_repair_interrupted_as_it_starts_is_finished_by_the_same_split(llama, tmp_path, monkeypatch):
    """The repair of a damaged directory deleted the manifest before it recorded its progress: killed in between, or
    failing on that first record (EIO), it left a folder with neither, which the same split then refused as holding
    no shard directory ("pass overwrite=True"). The progress is recorded first."""
    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    os.truncate(shards / "layers" / "00001.safetensors", 1000)
    real_fsync_dir = split_mod.fsync_dir

    def killed_once_the_manifest_is_gone(path):
        real_fsync_dir(path)
        if not (Path(path) / "manifest.json").exists():
            raise KeyboardInterrupt  # (what a SIGKILL leaves: nothing after this runs)

    with monkeypatch.context() as m:
        m.setattr(split_mod, "fsync_dir", killed_once_the_manifest_is_gone)
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint(llama["ckpt"], shards, progress=False)
    with pytest.raises(ShardDirError, match="unfinished split"):
        ShardDirectory(shards)
    resume_and_check(llama, shards, monkeypatch, damaged=("layers.1",))

    os.truncate(shards / "layers" / "00002.safetensors", 1000)
    with monkeypatch.context() as m:
        _fail_on(m, "write", ".progress.json", errno.EIO)
        with pytest.raises(OSError) as info:
            split_checkpoint(llama["ckpt"], shards, progress=False)
    assert info.value.errno == errno.EIO
    assert (shards / "manifest.json").exists()  # (a failed repair leaves the directory as it was)
    resume_and_check(llama, shards, monkeypatch, damaged=("layers.2",))


# --- the loader: a file damaged while a model streams from it -------------------------------------------------------


def _damage(kind: str, path: Path, other: Path) -> None:
    if kind == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "remove":
        path.unlink()
    elif kind == "replace_same_size":  # another layer's bytes: same size, same header layout
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("kind", ["truncate", "remove", "replace_same_size", "read_eio"])
def test_loader_error_mid_generation_then_fresh_load_is_exact(llama, tmp_path, monkeypatch, kind):
    import shutil

    from transformers import LogitsProcessor, LogitsProcessorList

    shards = tmp_path / "shards"
    shutil.copytree(llama["reference"], shards)
    model = streamed_model(llama["ckpt"], shards, **STREAM_ALL)
    LEDGER["faults_injected"] += 1
    target = shards / "layers" / "00002.safetensors"

    class DamageAfterFirstToken(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                if kind == "read_eio":  # the disk fails under the loader: every open or stat of the file raises EIO
                    real_os_open, real_open, real_stat = os.open, builtins.open, os.stat

                    def os_stat(path, *args, **kwargs):
                        if str(path).endswith("00002.safetensors"):
                            raise OSError(errno.EIO, "Input/output error", str(path))
                        return real_stat(path, *args, **kwargs)

                    def os_open(path, *args, **kwargs):
                        if str(path).endswith("00002.safetensors"):
                            raise OSError(errno.EIO, "Input/output error", str(path))
                        return real_os_open(path, *args, **kwargs)

                    def py_open(path, *args, **kwargs):
                        if str(path).endswith("00002.safetensors"):
                            raise OSError(errno.EIO, "Input/output error", str(path))
                        return real_open(path, *args, **kwargs)

                    monkeypatch.setattr(os, "open", os_open)
                    monkeypatch.setattr(os, "stat", os_stat)
                    monkeypatch.setattr(builtins, "open", py_open)
                else:
                    _damage(kind, target, shards / "layers" / "00001.safetensors")
            return scores

    proc = DamageAfterFirstToken()
    try:
        with pytest.raises(LayerLoadError, match="decoder layer") as info:
            model.generate(IDS, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([proc]))
    finally:
        disable_layer_streaming(model)
    assert "00002.safetensors" in str(info.value)
    assert proc.calls == 2  # it failed at the next token, not silently later with wrong weights
    monkeypatch.undo()
    # the damage is found by the cheap checks at the next load (or the transient error is gone), and the same
    # split run again repairs the directory, reading only the damaged unit from the source
    if kind != "read_eio":
        with pytest.raises(ShardDirError, match="00002.safetensors"):
            ShardDirectory(shards)
        keys = resume_and_check(llama, shards, monkeypatch, damaged=("layers.2",))
        assert sorted(keys) == sorted(llama["keys_by_unit"]["layers.2"])
    else:
        check_exact(llama, shards)
    LEDGER["faults_survived"] += 1


# --- summary -------------------------------------------------------------------------------------------------------


def test_summary():
    """Runs last in this module: the fault-injection numbers of this run (`pytest -s` shows them)."""
    print(
        "\ncrash-safety summary: kills landed {kills_landed} / attempted {kills_attempted}, survived {kills_survived} "
        "scenarios; faults injected {faults_injected}, survived {faults_survived}; data lost {data_lost}".format(
            **LEDGER
        )
    )
    assert LEDGER["data_lost"] == 0
    assert LEDGER["faults_survived"] == LEDGER["faults_injected"]


def test_an_interrupted_overwrite_resumed_without_it_still_replaces_the_old_split(tmp_path, monkeypatch):
    """`split_checkpoint(B, d, overwrite=True)` over a split of A (a deeper model with a generation config and chat
    template), interrupted while a layer was written, then run again as the error and the progress record allow, the
    same split without `overwrite`: the record matched, the run resumed, and it kept A's side files (B's streamed
    model got A's end-of-sequence ids and sampling settings) and A's deeper layer files. The record says it replaces
    a split now: the resumed run removes them as the uninterrupted one does (byte-identical to a fresh split)."""
    a = _models.save_tiny_checkpoint("llama", tmp_path / "a", num_hidden_layers=4)
    (a / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 99], "do_sample": True}))
    b = _models.save_tiny_checkpoint("llama", tmp_path / "b", num_hidden_layers=3, seed=7)
    for name in ("chat_template.jinja", "generation_config.json"):
        (b / name).unlink(missing_ok=True)
    d = split_checkpoint(a, tmp_path / "d", progress=False)
    assert (d / "generation_config.json").is_file() and (d / "layers" / "00003.safetensors").is_file()
    real = split_mod.atomic_write_safetensors

    def interrupted(path, *args, **kwargs):
        if str(path).endswith("00001.safetensors"):
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(split_mod, "atomic_write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(b, d, overwrite=True, progress=False)
    monkeypatch.setattr(split_mod, "atomic_write_safetensors", real)
    split_checkpoint(b, d, progress=False)
    fresh = split_checkpoint(b, tmp_path / "fresh", progress=False)
    assert tree(d) == tree(fresh)
    model = streamed_model(b, d)
    assert model.generation_config.eos_token_id != [2, 99] and not model.generation_config.do_sample
    disable_layer_streaming(model)
