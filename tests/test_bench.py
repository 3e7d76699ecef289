"""`hf-layerstream bench` end to end on a tiny demo model (each system in its own child process)."""

from __future__ import annotations

import json
import mmap
import os

import pytest

from hf_layerstream.bench import format_report, measure_disk_bandwidth
from hf_layerstream.cli import build_parser, main

TINY = ["--layers", "3", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]


def test_bench_demo_json_and_table(tmp_path, capsys):
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--max-new-tokens", "3", "--prompt-tokens", "8"]
    argv += ["--systems", "in_memory,streamed_disk", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"model", "disk", "baseline_rss", "rows", "targets"}
    assert report["model"]["num_layers"] == 3 and report["model"]["prompt_tokens"] == 8
    assert report["disk"]["bandwidth"] > 0 and report["disk"]["bytes"] == report["model"]["layer_file_bytes"]
    rows = {(r["system"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {("in_memory", "warm"), ("streamed_disk", "warm"), ("streamed_disk", "cold")}
    for r in rows.values():
        for key in ("s_per_token", "tokens_per_s", "peak_rss", "cuda_peak", "limit_s", "ratio_to_limit", "batch"):
            assert key in r, key
        assert r["s_per_token"] > 0 and r["peak_rss"] > 0 and r["batch"] == 1
        assert len(r["tokens"]) == 3
    assert rows[("in_memory", "warm")]["ratio_to_limit"] == pytest.approx(1.0)
    assert rows[("streamed_disk", "warm")]["same_tokens"] is True
    cold = rows[("streamed_disk", "cold")]
    assert cold["same_tokens"] is True and cold["target"] == report["targets"]["cold"]
    assert cold["bytes_per_sweep"] == report["model"]["layer_file_bytes"]
    assert cold["limit_s"] == pytest.approx(cold["bytes_per_sweep"] / report["disk"]["bandwidth"])
    assert cold["profile"]["forward_calls"] == 3 and cold["profile"]["bytes_read"] > 0
    assert "rss_allowed" in cold and "rss_over_baseline" in cold
    # cold means every layer really came from the disk, every sweep (the read-ahead for the next sweep too)
    assert cold["total_sweeps"] == 3
    if cold["disk_read_bytes"] is not None:
        assert cold["disk_read_bytes"] >= cold["total_sweeps"] * report["model"]["layer_file_bytes"]
    # the warm comparison in one process, alternating calls (default 6 each): same tokens, a ratio per system
    paired = report["paired"]
    assert paired["members"] == ["in_memory", "streamed_disk"]
    assert len(paired["calls"]["in_memory"]) == len(paired["calls"]["streamed_disk"]) == 6
    assert paired["same_tokens"] == {"streamed_disk": True}
    assert paired["tokens"]["in_memory"] == rows[("in_memory", "warm")]["tokens"]
    ratios = sorted(a / b for a, b in zip(paired["calls"]["streamed_disk"], paired["calls"]["in_memory"]))
    assert paired["ratios"]["streamed_disk"] == ratios[len(ratios) // 2]
    assert paired["targets"] == {"streamed_disk": report["targets"]["warm"]}
    table = format_report(report)
    assert "warm, in one process, alternating generate calls (6 each" in table
    assert "hf_layerstream (every layer from disk): " in table and "median of per-call ratios" in table
    assert "whole model in RAM" in table and "every layer from disk" in table
    assert "disk read bandwidth" in table and "s/token" in table and "x limit" in table
    # the work folder was kept (--work): a second run reuses the checkpoint and the split
    assert (tmp_path / "checkpoint" / "config.json").exists() and (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--systems", "in_memory,bogus"], "--systems"),
        (["--modes", "lukewarm"], "--modes"),
        (["--batch-sizes", "1,0"], "--batch-sizes"),
        (["--max-new-tokens", "1"], "--max-new-tokens"),
        (["--paired-calls", "-1"], "--paired-calls"),
        (["--assistant", "/nonexistent/draft"], "--assistant"),
    ],
)
def test_bench_rejects_bad_options(tmp_path, capsys, extra, message):
    assert main(["bench", "--demo", *TINY, "--work", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bench_needs_a_source(capsys):
    assert main(["bench"]) == 2
    assert "--demo" in capsys.readouterr().err


def test_bench_parser_registered():
    args = build_parser().parse_args(["bench", "--demo", "--batch-sizes", "1,4", "--assistant", "demo"])
    assert args.handler.__name__ == "run_bench" and args.batch_sizes == "1,4" and args.assistant == "demo"


def test_disk_bandwidth(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (3 * 2**20 + 123))  # not a multiple of the block size: the tail still counts
    result = measure_disk_bandwidth([path], chunk=2**20)
    assert result["bytes"] == 3 * 2**20 + 123
    assert result["bandwidth"] > 0 and result["seconds"] > 0 and result["method"]
    # the faster of the ways tried is the limit
    assert result["bandwidth"] == max(result["by_method"].values())
    assert result["method"] in result["by_method"]
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert len(result["by_method"]) == 2
    # with several files, the same ways reading two files at once too; every way reads every byte
    other = tmp_path / "blob2"
    other.write_bytes(b"\2" * (2**20 + 7))
    both = measure_disk_bandwidth([path, other], chunk=2**20)
    assert both["bytes"] == 4 * 2**20 + 130
    assert len(both["by_method"]) == 2 * len(result["by_method"])
    assert sum("2 files at once" in way for way in both["by_method"]) == len(result["by_method"])
    assert both["bandwidth"] == max(both["by_method"].values())


def test_warm_measurement_starts_from_a_warm_page_cache(tmp_path):
    """A warm row times a model whose weights are in the page cache, whatever evicted them before (an earlier cold
    run, the host's reclaim): one untimed call first."""
    from hf_layerstream._measure import drop_page_cache, measure, weight_files
    from hf_layerstream.demo import write_demo_checkpoint
    from hf_layerstream.split import split_checkpoint

    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=3, hidden_size=256, intermediate_size=512, vocab_size=256, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    layer_bytes = sum(p.stat().st_size for p in (shards / "layers").glob("*.safetensors"))
    spec = {"system": "streamed", "path": str(shards), "max_memory": {"cpu": 0}, "input_ids": [5, 6, 7, 8]}
    spec["max_new_tokens"] = 3
    files = weight_files("streamed", str(shards))
    os.sync()  # pages just written are dirty: they leave the page cache only once on the disk
    drop_page_cache(files)
    unwarmed = measure({**spec, "warmup": False})
    # (the loader may start reading the first layers while the model loads, before the count starts)
    if unwarmed["disk_read_bytes"] is None or unwarmed["disk_read_bytes"] < layer_bytes // 2:
        pytest.skip("files cannot be dropped from the page cache here (or reads are not accounted)")
    drop_page_cache(files)
    warm = measure(spec)
    assert warm["disk_read_bytes"] < layer_bytes // 8
    assert warm["tokens"] == unwarmed["tokens"] and warm["total_sweeps"] == 3


def test_rewarm_leaves_files_whole_in_the_page_cache_in_large_folios(tmp_path):
    """Before the warm comparison in one process the shard files are read back as our loader reads them: whole in the
    page cache, and (where the file system has large folios) in 2 MiB folios, however `read()` left them."""
    from _pagecache import cached_share, drop_from_page_cache, map_cpu_per_mib

    from hf_layerstream._safetensors import huge_pages_enabled
    from hf_layerstream.bench import _rewarm
    from hf_layerstream.engine import _SMALL_PAGES_CPU_PER_MIB

    path = tmp_path / "layer"
    size = 16 * 2**20
    path.write_bytes(os.urandom(size))

    def read_half_in_small_folios() -> None:  # as a buffered read leaves a file
        drop_from_page_cache([path])
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for offset in range(0, size // 2, 2**20):
                os.pread(fd, 2**20, offset)
        finally:
            os.close(fd)

    if huge_pages_enabled():  # what tells the two apart here, before `_rewarm` is asked to make one of them
        drop_from_page_cache([path])
        map_cpu_per_mib(path)  # read from the disk through a huge-page map
        large = min(map_cpu_per_mib(path) for _ in range(3))
        if large > _SMALL_PAGES_CPU_PER_MIB:
            pytest.skip("this file system does not keep files in 2 MiB page-cache folios")
        read_half_in_small_folios()
        map_cpu_per_mib(path)  # reads the other half in
        if min(map_cpu_per_mib(path) for _ in range(3)) < 2 * large:
            pytest.skip("small folios map about as cheaply as large ones here: nothing to tell apart")
    read_half_in_small_folios()
    if cached_share(path) > 0.6:
        pytest.skip("files cannot be dropped from the page cache here")
    _rewarm([path])
    assert cached_share(path) == 1.0
    if huge_pages_enabled():
        assert min(map_cpu_per_mib(path) for _ in range(3)) < _SMALL_PAGES_CPU_PER_MIB


def test_paired_warm_measurement_alternates_in_one_process(tmp_path):
    """In one process: each member warmed, then timed calls alternating, the first member the reference."""
    from hf_layerstream._measure import measure_paired
    from hf_layerstream.demo import write_demo_checkpoint
    from hf_layerstream.split import split_checkpoint

    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=2, hidden_size=64, intermediate_size=128, vocab_size=256, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    members = [
        {"name": "in_memory", "system": "in_memory", "path": str(ckpt)},
        {"name": "streamed_disk", "system": "streamed", "path": str(shards), "max_memory": {"cpu": 0}},
        {"name": "streamed", "system": "streamed", "path": str(shards)},
    ]
    out = measure_paired(
        {"system": "paired", "members": members, "calls": 3, "input_ids": [5, 6, 7, 8], "max_new_tokens": 3}
    )
    assert out["members"] == ["in_memory", "streamed_disk", "streamed"]
    assert set(out["ratios"]) == {"streamed_disk", "streamed"}
    assert all(len(v) == 3 and min(v) > 0 for v in out["calls"].values())
    for name in ("streamed_disk", "streamed"):
        assert out["tokens"][name] == out["tokens"]["in_memory"] and len(out["tokens"][name]) == 3
        per_call = sorted(a / b for a, b in zip(out["calls"][name], out["calls"]["in_memory"]))
        assert out["ratios"][name] == per_call[1]
        assert out["s_per_token"][name] == sorted(out["calls"][name])[1]


def test_report_says_when_compressed_tokens_were_not_compared():
    """Without the in-memory row there is no reference for a compressed row's tokens: the note must say so rather
    than print an agreement of 0%."""
    row = {
        "system": "streamed_disk_8bit",
        "label": "hf_layerstream, 8bit shards (from disk)",
        "mode": "cold",
        "batch": 1,
        "s_per_token": 1.0,
        "tokens_per_s": 1.0,
        "peak_rss": 10**9,
        "speedup_vs_full_precision": 0.9,
    }
    report = {
        "model": {"num_layers": 2, "layer_file_bytes": 10**9, "resident_bytes": 10**8, "prompt_tokens": 4},
        "disk": None,
        "baseline_rss": 4 * 10**8,
        "rows": [row],
    }
    report["model"]["max_new_tokens"] = 3
    assert "not compared (no in-memory row)" in format_report(report)
    row["token_agreement"] = 0.375
    text = format_report(report)
    assert "agreeing with full precision: 38%" in text and "not compared" not in text
