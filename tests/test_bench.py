"""`hf-layerstream bench` end to end on a tiny demo model (each system in its own child process)."""

from __future__ import annotations

import json
import mmap
import os
import time
import types
from pathlib import Path

import _models
import pytest
import torch

from hf_layerstream import ShardDirectory
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
    # each cold step is also held against a read of its layer files, the fastest way, just before it
    if "paired_disk" in cold:  # (where the peak RSS can be set back after each read)
        pd = cold["paired_disk"]
        # (the way fastest over the rounds before the runs: the one after them may differ, the report keeps the faster)
        assert pd["way"] == report["disk"]["sample_ways"][0] and pd["files"] == 3 and len(pd["ratios"]) == 2
        assert report["disk"]["pair_way"] in report["disk"]["sample_ways"]
        assert pd["bytes_per_sweep"] == report["model"]["layer_file_bytes"]
    # the warm comparison in one process, alternating calls (default 10 each): same tokens, a ratio per system
    paired = report["paired"]
    assert paired["members"] == ["in_memory", "streamed_disk"]
    assert len(paired["calls"]["in_memory"]) == len(paired["calls"]["streamed_disk"]) == 10
    assert paired["same_tokens"] == {"streamed_disk": True}
    assert paired["tokens"]["in_memory"] == rows[("in_memory", "warm")]["tokens"]
    ratios = sorted(a / b for a, b in zip(paired["calls"]["streamed_disk"], paired["calls"]["in_memory"]))
    assert paired["ratios"]["streamed_disk"] == pytest.approx((ratios[4] + ratios[5]) / 2)  # (the median of 10)
    assert paired["spread"]["streamed_disk"] == [ratios[2], ratios[7]]  # the middle half of the 10 ratios
    assert paired["targets"] == {"streamed_disk": report["targets"]["warm"]}
    table = format_report(report)
    assert "warm, in one process, alternating generate calls (10 each" in table
    low, high = paired["spread"]["streamed_disk"]
    assert f"the middle half {low:.2f}x-{high:.2f}x; target <= 1.10" in table
    assert "hf_layerstream (every layer from disk): " in table and "median of per-call ratios" in table
    assert "whole model in RAM" in table and "every layer from disk" in table
    assert "disk read bandwidth" in table and "s/token" in table and "x limit" in table
    if "paired_disk" in cold:
        assert f"each step against a read of its 3 layer files ({pd['way']}" in table
        assert f": {cold['paired_disk']['ratio']:.2f}x (median of 2 steps; target <= 1.15" in table
    # each row shows its prompt pass (time to the first token), which s/token leaves out
    assert "prompt s" in table
    for r in rows.values():
        assert 0 < r["prefill_s"]
        line = next(li for li in table.splitlines() if li.startswith(r["label"][:40]) and f" {r['mode']} " in li)
        assert f" {r['prefill_s']:.3f} " in line, line
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
        # (it read "(or `--demo` with `--demo`)": the command line writes a backticked option name as the option)
        (["--assistant", "nope"], "sharing the tokenizer (or demo, with `--demo`)."),
        (["--device", "tpu"], "`--device` 'tpu' is not a valid torch device"),
        (["--dtype", "bfloat61"], "`--dtype` 'bfloat61' is not a checkpoint dtype"),
        (["some/shards"], "either SOURCE ('some/shards') or `--demo`"),
        (["--checkpoint", "some/ckpt"], "`--checkpoint` is not used with `--demo`"),
        # what failed only in the children, after the demo model was written and split (rows 'failed', exit 0)
        (["--max-memory", "cpu=lots"], "`--max-memory` got the size 'lots'"),
        (["--max-memory", "gpu=1GiB"], "`--max-memory` key 'gpu' is not recognized"),
        (["--max-memory", "cpu=4iB"], "`--max-memory` got the size '4iB'"),
        (["--max-memory", "\u00b2=1GiB"], "`--max-memory` key '\u00b2' is not recognized"),
        (["--prompt-tokens", "0"], "`--prompt-tokens` is 0; use at least 1"),
        # (a huge one grew a list of token ids by doubling until the machine ran out of memory; the demo's context is
        # its config's 2048 positions)
        (["--prompt-tokens", "2049"], "`--prompt-tokens` is 2049, more than the 2048 positions of the model's"),
        (["--prompt-tokens", str(10**23)], f"`--prompt-tokens` is {10**23}, more than the 2048 positions of the"),
        (["--threads", "0"], "`--threads` is 0; use at least 1"),
        (["--threads", "-2"], "`--threads` is -2; use at least 1"),
        (["--timeout", "0"], "`--timeout` is 0.0; use a positive number"),
        (["--compression", "3bit"], "`--compression` got '3bit'"),
        # (a shell variable left unset, `--compression "$SCHEMES"`: the rows asked for were left out without a word)
        (["--compression", ""], "`--compression` got ''; choose a comma-separated subset of 4bit, 4bit-dq, 8bit."),
        # a selection that leaves nothing to measure (the bench measured nothing and exited 0)
        (["--systems", ""], "choose a comma-separated subset of in_memory, accelerate_offload, streamed,"),
        (
            ["--systems", "streamed_host", "--device", "cpu"],
            "`--systems` 'streamed_host' leaves nothing to measure here (streamed_host needs a CUDA device); choose "
            "from in_memory, accelerate_offload, streamed, streamed_disk.",
        ),
        (
            ["--systems", "in_memory", "--modes", "cold"],
            "`--systems` 'in_memory' leaves nothing to measure here (in_memory is measured warm only)",
        ),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bench_rejects_bad_options(tmp_path, capsys, extra, message):
    """Refused before any work (a SOURCE or `--checkpoint` beside `--demo` was ignored: the demo model was measured)."""
    quick = ["--systems", "streamed", "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]
    assert main(["bench", "--demo", *TINY, "--work", str(tmp_path), *quick, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


def test_a_prompt_longer_than_a_models_context_or_the_memory_is_refused(monkeypatch):
    """`--prompt-tokens` past the model's context (its config's `max_position_embeddings`, times its RoPE scaling
    factor where it has one: what a long-context config allows), and for a model without one (Mamba's) past what the
    memory available can hold of its token ids alone: the bench grew a list of token ids to that length by doubling
    it, until the machine ran out of memory. Refused before anything is measured."""
    from transformers import LlamaConfig, MambaConfig

    from hf_layerstream import bench as bench_mod
    from hf_layerstream import engine

    scaled = LlamaConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 4.0})
    bench_mod._refuse_a_prompt_past_the_context(scaled, 16384)
    with pytest.raises(
        ValueError, match=r"`--prompt-tokens` is 16385, more than the 16384 positions of the model's co"
    ):
        bench_mod._refuse_a_prompt_past_the_context(scaled, 16385)
    bench_mod._refuse_a_prompt_past_the_context(MambaConfig(), 10**6)  # (no position limit: the memory's, below)
    monkeypatch.setattr(engine, "available_host_memory", lambda: 8 * 10**6)
    bench_mod._refuse_a_prompt_past_the_memory(10**6)
    with pytest.raises(ValueError, match=r"`--prompt-tokens` is 1000001: its token ids alone take 8\.00 MB"):
        bench_mod._refuse_a_prompt_past_the_memory(10**6 + 1)


def test_bench_refuses_systems_that_need_the_checkpoint_it_was_not_given(tmp_path, capsys, checkpoints):
    """SOURCE a shard directory without `--checkpoint`: the whole model in memory and accelerate's offload are
    skipped; asking for those alone measured nothing and exited 0."""
    _, shards = checkpoints("llama")
    argv = ["bench", str(shards), "--work", str(tmp_path / "w"), "--device", "cpu", "--modes", "warm"]
    assert main([*argv, "--systems", "in_memory,accelerate_offload,streamed_host"]) == 2
    assert (
        "`--systems` 'in_memory,accelerate_offload,streamed_host' leaves nothing to measure here (in_memory needs "
        "the original checkpoint (`--checkpoint`); accelerate_offload needs the original checkpoint (`--checkpoint`); "
        "streamed_host needs a CUDA device); choose from streamed, streamed_disk." in capsys.readouterr().err
    )
    assert not (tmp_path / "w").exists()


def test_bench_takes_a_hub_repo_holding_a_shard_directory_as_one(tmp_path, capsys, checkpoints, monkeypatch):
    """SOURCE a hub repo holding a shard directory: downloaded, and measured as the shard directory it is (it was
    taken for a checkpoint, downloaded, and refused as having no weights)."""
    from huggingface_hub import constants

    _, shards = checkpoints("llama")
    _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--llama-layers")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "someorg/llama-layers", "--work", str(tmp_path / "w"), "--device", "cpu", "--modes", "warm"]
    assert main([*argv, "--systems", "in_memory,accelerate_offload"]) == 2
    assert "in_memory needs the original checkpoint (`--checkpoint`)" in capsys.readouterr().err


def test_bench_takes_a_hub_repo_at_a_revision(tmp_path, capsys, checkpoints, monkeypatch):
    """`--revision` (and `--token`) for a hub repo SOURCE: its default branch was measured. Here the default branch
    holds a README only; the tag `v2` a shard directory, measured as one."""
    from huggingface_hub import constants

    _, shards = checkpoints("llama")
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("soon")
    _models.hub_snapshot(tmp_path / "readme", tmp_path / "cache", repo="someorg--llama-layers")
    _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--llama-layers", commit="b" * 40, ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "someorg/llama-layers", "--work", str(tmp_path / "w"), "--device", "cpu", "--modes", "warm"]
    argv += ["--systems", "in_memory,accelerate_offload"]
    assert main(argv) == 2
    assert "Cannot fetch config.json of 'someorg/llama-layers'" in capsys.readouterr().err
    assert main([*argv, "--revision", "v2", "--token", "hf_secret"]) == 2
    assert "in_memory needs the original checkpoint (`--checkpoint`)" in capsys.readouterr().err


def test_a_hub_checkpoint_is_fetched_at_its_revision_with_the_token(tmp_path, capsys, checkpoints, monkeypatch, caplog):
    """A hub repo `--checkpoint`: its rows loaded the repo id in child processes, which get no token (a gated one given
    `--token` failed there, after the streamed rows), at its default branch (`--revision` is SOURCE's). It is fetched
    first, at `--checkpoint-revision`, with `--token`, and the rows load that folder (here the children see neither
    the hub cache nor offline mode: they would fail on the repo id). Here the default branch holds a README only."""
    import huggingface_hub
    from huggingface_hub import constants

    ckpt, shards = checkpoints("llama")
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("soon")
    _models.hub_snapshot(tmp_path / "readme", tmp_path / "cache", repo="someorg--llama")
    v2 = _models.hub_snapshot(ckpt, tmp_path / "cache", repo="someorg--llama", commit="b" * 40, ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    asked = []
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("revision"), kwargs.get("token")))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    argv = ["bench", str(shards), "--checkpoint", "someorg/llama", "--work", str(tmp_path / "w"), "--device", "cpu"]
    argv += ["--systems", "in_memory,streamed", "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert "Cannot fetch config.json of 'someorg/llama'" in capsys.readouterr().err
    assert main([*argv, "--checkpoint-revision", "v2", "--token", "hf_secret", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert asked == [("someorg/llama", "v2", "hf_secret")]
    assert Path(report["model"]["checkpoint"]).resolve() == v2.resolve()
    rows = {r["system"]: r for r in report["rows"]}
    assert rows["in_memory"]["s_per_token"] and rows["streamed"]["same_tokens"] is True
    # without `--checkpoint`: refused; with a local one: warned about, and the folder read as it is
    assert main(["bench", str(shards), "--checkpoint-revision", "v2", *argv[4:]]) == 2
    assert "`--checkpoint-revision` only applies with `--checkpoint`" in capsys.readouterr().err
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        assert main(["bench", str(shards), "--checkpoint", str(ckpt), "--checkpoint-revision", "v2", *argv[4:]]) == 0
    assert f"`--checkpoint-revision` 'v2' applies to hub repos; {ckpt} is a local folder, read as it is." in caplog.text
    assert "`--token` applies to hub repos" not in caplog.text  # (nor above, where it served the hub `--checkpoint`)


def test_a_hub_checkpoint_of_bin_files_is_downloaded_with_them(tmp_path, capsys, checkpoints, monkeypatch):
    """A hub repo SOURCE holding its weights as `.bin` files only (as `from_pretrained` falls back to): bench
    downloaded the safetensors files, the JSON and tokenizer files, none of its weights, and the split found them
    missing. They are downloaded where no safetensors file is (the hub here: a folder, its files fetched as asked)."""
    import fnmatch
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_file

    ckpt, _ = checkpoints("llama")
    remote = tmp_path / "remote"
    shutil.copytree(ckpt, remote)
    index = json.loads((remote / "model.safetensors.index.json").read_text())
    state = {}
    for name in sorted(set(index["weight_map"].values())):
        state.update(load_file(remote / name))
        (remote / name).unlink()
    (remote / "model.safetensors.index.json").unlink()
    torch.save(state, remote / "pytorch_model.bin")
    local, asked = tmp_path / "downloaded", []

    def fetch(name):
        if not (remote / name).is_file():
            raise EntryNotFoundError(f"404 {name}")
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / name, local / name)
        return str(local / name)

    def hf_hub_download(repo_id, filename, **kwargs):
        return fetch(filename)

    def snapshot_download(repo_id, *, allow_patterns, **kwargs):
        asked.append(allow_patterns)
        for path in remote.rglob("*"):
            name = str(path.relative_to(remote))
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                fetch(name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "someorg/llama-bin", "--work", str(tmp_path / "w"), "--device", "cpu", "--json"]
    argv += ["--systems", "in_memory,streamed", "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]
    assert main(argv) == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["in_memory"]["s_per_token"] and rows["streamed"]["same_tokens"] is True
    assert asked[-1] == ["pytorch_model*.bin"] and (local / "pytorch_model.bin").is_file()


def test_bench_refuses_a_checkpoint_of_another_model_than_the_shards(tmp_path, capsys, checkpoints):
    """`bench SHARDS --checkpoint OTHER` measured both and said the streamed output was not the same (exit 1), as if
    streaming were wrong. Refused before anything is measured, as another model."""
    _, shards = checkpoints("llama")
    other, _ = checkpoints("gpt2")
    argv = ["bench", str(shards), "--checkpoint", str(other), "--work", str(tmp_path / "w"), "--device", "cpu"]
    assert main([*argv, "--modes", "warm", "--systems", "in_memory,streamed", "--paired-calls", "0"]) == 2
    err = capsys.readouterr().err
    assert f"`--checkpoint` {str(other)!r} is not the model SOURCE {str(shards)!r} was split from" in err
    assert not (tmp_path / "w").exists()


def test_bench_refuses_a_shard_directory_as_its_checkpoint(tmp_path, capsys, checkpoints):
    """`bench SHARDS --checkpoint SHARDS` (the shard directory for the checkpoint: its config.json builds the same
    model) measured the streamed rows, then failed the whole model's and accelerate's, each with transformers'
    traceback ("no file named model.safetensors"), exit 1. Refused before anything is measured, naming the fix."""
    _, shards = checkpoints("llama")
    argv = ["bench", str(shards), "--checkpoint", str(shards), "--work", str(tmp_path / "w"), "--device", "cpu"]
    assert main([*argv, "--modes", "warm", "--systems", "in_memory,streamed", "--paired-calls", "0"]) == 2
    captured = capsys.readouterr()
    assert f"`--checkpoint` {str(shards)!r} is a shard directory (it holds manifest.json), not a checkpoint" in (
        captured.err
    )
    assert "Traceback" not in captured.err and "s/token" not in captured.out and not (tmp_path / "w").exists()


def test_bench_refuses_a_prompt_past_a_learned_position_table(tmp_path, capsys, checkpoints):
    """`--prompt-tokens` and `--max-new-tokens` past GPT-2's learned position table (256 positions in the tiny
    config) failed every row in its child process with torch's traceback ("IndexError: index out of range in self"),
    exit 1, after the split; `generate` refuses it up front. Refused before anything is split or measured, as the
    checkpoint or as the shard directory; the most that fits (a prompt and new tokens adding up to 257) runs."""
    ckpt, shards = checkpoints("gpt2")
    quick = ["--systems", "streamed", "--modes", "warm", "--paired-calls", "0", "--device", "cpu"]
    message = (
        "`--prompt-tokens` 250 and `--max-new-tokens` 8 run past the 256 positions of GPT2LMHeadModel's learned "
        "position table (`max_position_embeddings`): pass values that add up to 257 or less."
    )
    for source in (ckpt, shards):
        argv = ["bench", str(source), "--work", str(tmp_path / "w"), "--prompt-tokens", "250", *quick]
        assert main(argv) == 2, source
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err, source
        assert not (tmp_path / "w").exists(), source
    argv = ["bench", str(shards), "--work", str(tmp_path / "w"), "--prompt-tokens", "249", "--json", *quick]
    assert main(argv) == 0
    assert [r["new_tokens"] for r in json.loads(capsys.readouterr().out)["rows"]] == [8]


def test_bench_expands_a_tilde_in_its_paths(tmp_path, capsys, monkeypatch, checkpoints):
    """`bench "~/m.layers"` took the path for a hub id (`Path` does not expand it)."""
    ckpt, shards = checkpoints("llama")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.layers").symlink_to(shards)
    (tmp_path / "ckpt").symlink_to(ckpt)
    other, _ = checkpoints("gpt2")
    argv = ["bench", "~/m.layers", "--checkpoint", str(other), "--work", "~/w", "--device", "cpu", "--modes", "warm"]
    assert main([*argv, "--systems", "in_memory,streamed", "--paired-calls", "0"]) == 2  # (checked as a shard dir)
    assert f"is not the model SOURCE {str(tmp_path / 'm.layers')!r} was split from" in capsys.readouterr().err


def test_bench_refuses_systems_left_empty_by_a_model_too_large_for_memory(tmp_path, monkeypatch, capsys):
    """`--systems in_memory` where the whole model does not fit: it was skipped, and nothing measured (exit 0).
    Refused before the disk is measured for the cold rows (it was measured first)."""
    from hf_layerstream import bench, engine

    monkeypatch.setattr(engine, "available_host_memory", lambda: 1000)
    disk = []
    monkeypatch.setattr(bench, "measure_disk_bandwidth", lambda files: disk.append(files))
    asked = _children_asked(monkeypatch)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--modes", "warm,cold", "--device", "cpu"]
    assert main([*argv, "--systems", "in_memory"]) == 2
    err = capsys.readouterr().err
    assert "`--systems` 'in_memory' leaves nothing to measure: the whole model in memory (in_memory) does not" in err
    assert "are more than 90% of this machine's available RAM (0.00 GB). Add one of ours" in err
    assert asked == [] and disk == []


@pytest.mark.parametrize("where", ["shards", "shards-4bit"])
def test_bench_does_not_advise_an_overwrite_option_it_lacks(tmp_path, capsys, checkpoints, where):
    """A `--work` folder holding another model's split: split's refusal told the user to pass `--overwrite`, which
    bench does not take (its parser refuses it), nor would it overwrite the split there."""
    import shutil

    import _models

    _, other = checkpoints("llama")
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=3)
    shutil.copytree(other, tmp_path / "w" / where)
    argv = ["bench", str(ckpt), "--work", str(tmp_path / "w"), "--device", "cpu", "--systems", "streamed"]
    argv += ["--modes", "warm", "--paired-calls", "0"] + (["--compression", "4bit"] if where != "shards" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"`shard_dir` {tmp_path / 'w' / where} already holds a split of another model" in err
    assert "--overwrite" not in err and "overwrite=True" not in err
    assert (
        "bench does not overwrite a split in its `--work` folder: pass another `--work`, or delete "
        f"{tmp_path / 'w' / where} to have it split there anew." in err
    )
    assert ShardDirectory(tmp_path / "w" / where).num_layers == ShardDirectory(other).num_layers  # left as it was


def test_split_refusals_of_an_occupied_directory_are_told_apart_by_type(tmp_path, checkpoints):
    """bench recognizes split's refusal of an occupied directory by its type (it matched the message's text), for
    each of the three: another model's split, an unfinished one, a newer format's. Other refusals pass through."""
    import json
    import pickle
    import shutil

    import _models

    from hf_layerstream import ShardDirError, ShardDirOccupiedError, split_checkpoint
    from hf_layerstream.bench import split_in_work

    _, other = checkpoints("llama")
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=3)
    taken = shutil.copytree(other, tmp_path / "taken")
    with pytest.raises(ShardDirOccupiedError) as refused:
        split_checkpoint(ckpt, taken, progress=False)
    assert refused.value.problem.endswith(
        "already holds a split of another model, another source checkpoint or with other options (what differs: the "
        f"source: {ShardDirectory(other).manifest.source['id']} there, {ckpt} given)."
    )
    assert "overwrite=True" in refused.value.fix and str(refused.value).endswith(refused.value.fix)
    copy = pickle.loads(pickle.dumps(refused.value))
    assert (type(copy), str(copy), copy.problem) == (ShardDirOccupiedError, str(refused.value), refused.value.problem)
    newer = shutil.copytree(other, tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 10**6}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".progress.json").write_text(json.dumps({"options": {"another": "split"}, "units": []}))
    for dest, said in [(taken, "already holds a split"), (newer, "newer hf_layerstream"), (unfinished, "unfinished")]:
        with pytest.raises(ShardDirError) as told:
            split_in_work(ckpt, dest)
        assert not isinstance(told.value, ShardDirOccupiedError) and said in str(told.value)
        assert "bench does not overwrite a split" in str(told.value) and "overwrite=True" not in str(told.value)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ShardDirError) as other_refusal:  # (not an occupied directory: passed on as split said it)
        split_in_work(ckpt, tmp_path / "a-file")
    assert str(other_refusal.value) == f"`shard_dir` {tmp_path / 'a-file'} exists and is not a directory."


def test_bench_refuses_a_checkpoint_beside_a_checkpoint_source(tmp_path, capsys):
    """`--checkpoint` only serves a SOURCE that is a shard directory; beside a checkpoint it was silently ignored."""
    import _models

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    argv = ["bench", str(ckpt), "--checkpoint", str(ckpt), "--work", str(tmp_path / "w"), "--systems", "streamed"]
    assert main([*argv, "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]) == 2
    assert "`--checkpoint` is only used when SOURCE is a shard directory" in capsys.readouterr().err
    assert not (tmp_path / "w" / "shards").exists()


@pytest.mark.parametrize(
    "extra, named",
    [(["--layers", "4"], "--layers:"), (["--hidden-size", "64", "--dtype", "float32"], "--hidden-size, --dtype:")],
)
def test_bench_refuses_the_demo_sizes_beside_a_source(tmp_path, capsys, extra, named):
    """`--layers`, `--hidden-size`, ... and `--dtype` size the model `--demo` writes; beside a SOURCE they were
    silently ignored (the table measured SOURCE at its own sizes)."""
    argv = ["bench", str(tmp_path / "ckpt"), *extra, "--work", str(tmp_path / "w"), "--systems", "streamed"]
    assert main([*argv, "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]) == 2
    assert f"{named} only for the model `--demo` writes" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bench_demo_refuses_a_work_folder_holding_a_checkpoint_of_other_sizes(tmp_path, capsys):
    """`bench --demo --work W` measured the checkpoint already in W, whatever the size options said."""
    from hf_layerstream.demo import write_demo_checkpoint

    write_demo_checkpoint(tmp_path / "checkpoint", layers=2, hidden_size=64, intermediate_size=128, vocab_size=256)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--systems", "streamed", "--modes", "warm"]
    assert main([*argv, "--paired-calls", "0", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint of layers 2, hidden 64" in err and "not the layers 3, hidden 64" in err
    assert not (tmp_path / "shards").exists()


def test_bench_help_points_to_the_readme(capsys):
    """The demo model is described in the README's Performance section (there is no BENCHMARKS.md)."""
    from pathlib import Path

    import hf_layerstream.bench as bench_module

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join((capsys.readouterr().out + bench_module.__doc__).split())  # (help is wrapped to the terminal)
    assert "BENCHMARKS.md" not in text and text.count("README's Performance section") == 2
    readme = Path(bench_module.__file__).parents[1] / "README.md"
    assert "\n## Performance\n" in readme.read_text()


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
    assert result["cpu_steal_share"] is None or 0 <= result["cpu_steal_share"] <= 1  # (None: under a clock tick)
    # with several files, the same ways reading two files at once too; every way reads every byte
    other = tmp_path / "blob2"
    other.write_bytes(b"\2" * (2**20 + 7))
    both = measure_disk_bandwidth([path, other], chunk=2**20)
    assert both["bytes"] == 4 * 2**20 + 130
    assert len(both["by_method"]) == 2 * len(result["by_method"])
    assert sum("2 files at once" in way for way in both["by_method"]) == len(result["by_method"])
    assert both["bandwidth"] == max(both["by_method"].values())


def test_a_cold_step_is_paired_with_the_way_fastest_over_all_rounds(tmp_path, monkeypatch):
    """The limit is the fastest read of all, but a cold step is paired with the way fastest over every round
    together: one lucky read of a way that is slow after (an `O_DIRECT` read on a shared disk made every step 0.35x
    a "plain read" of its bytes) does not become the steps' yardstick. Each way is tried `rounds` times, every other
    round in the reverse order, and a way that failed in a round is not paired with."""
    import time

    from hf_layerstream import bench

    path = tmp_path / "blob"
    path.write_bytes(b"\1" * 1000)
    calls = []

    def way(name, delays):
        def read(paths):
            calls.append(name)
            delay = delays[sum(c == name for c in calls) - 1]
            if delay is None:
                raise OSError("refused")
            time.sleep(delay)
            return 1000, name

        return read

    ways = {  # (tens of milliseconds apart: a loaded machine delayed a 0.1 ms sleep past a 1 ms one)
        "lucky": way("lucky", [0.05, 1.0]),
        "steady": way("steady", [0.2, 0.2]),
        "failing": way("failing", [0.0001, None]),
    }
    monkeypatch.setattr(bench, "disk_ways", lambda **kwargs: ways)
    result = measure_disk_bandwidth([path], rounds=2)
    assert calls == ["lucky", "steady", "failing", "failing", "steady", "lucky"]
    assert result["way"] == "failing" and result["bandwidth"] == max(result["by_method"].values())
    assert result["by_method"]["lucky"] > result["by_method"]["steady"]  # (its lucky read, the faster of its two)
    assert result["pair_way"] == "steady"
    with pytest.raises(ValueError, match="`rounds` must be a positive int"):
        measure_disk_bandwidth([path], rounds=0)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no huge-page map way here")
def test_disk_bandwidth_skips_a_way_that_runs_out_of_memory(tmp_path, monkeypatch):
    """Reading through a huge-page map where memory is short (`MADV_POPULATE_READ`: `ENOMEM`, a `MemoryError`) skips
    that way, as a refused `O_DIRECT` or a failed read does: the disk is measured by the others (it stopped bench)."""
    import errno

    from hf_layerstream import _safetensors
    from hf_layerstream.bench import MAPPED_WAY, _rewarm

    if _safetensors._MADV_POPULATE_READ is None:
        pytest.skip("no MADV_POPULATE_READ here")

    def out_of_memory(mm, advice, address=None):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(_safetensors, "madvise_released", out_of_memory)
    paths = [tmp_path / "a", tmp_path / "b"]
    for p in paths:
        p.write_bytes(b"\1" * 2**20)
    result = measure_disk_bandwidth(paths, chunk=2**20)
    assert result["bytes"] == 2 * 2**20 and result["bandwidth"] > 0
    assert set(result["by_method"]) == {"O_DIRECT", "O_DIRECT, 2 files at once"}
    assert all(MAPPED_WAY not in way for way in result["by_method"])
    _rewarm(paths)  # (logged, not raised: the child's warm-up reads them instead)


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
    spec["prefetch"] = 0  # no layer is read while the model loads, before the count starts: the calls read them all
    files = weight_files("streamed", str(shards))
    os.sync()  # pages just written are dirty: they leave the page cache only once on the disk
    drop_page_cache(files)
    unwarmed = measure({**spec, "warmup": False})
    if unwarmed["disk_read_bytes"] is None or unwarmed["disk_read_bytes"] < layer_bytes // 2:
        pytest.skip("files cannot be dropped from the page cache here (or reads are not accounted)")
    drop_page_cache(files)
    warm = measure(spec)
    assert warm["disk_read_bytes"] < layer_bytes // 8
    assert warm["tokens"] == unwarmed["tokens"] and warm["total_sweeps"] == 3


def _tmpfs_dir():
    """A folder on a tmpfs (/dev/shm), where dropping files from the page cache does nothing; skips where none."""
    import tempfile

    from hf_layerstream._measure import cached_after_drop

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    folder = tempfile.mkdtemp(dir="/dev/shm", prefix="hf_layerstream_test_")
    probe = os.path.join(folder, "probe")
    with open(probe, "wb") as f:
        f.write(b"\1" * 2**20)
    share = cached_after_drop([probe])
    os.remove(probe)
    if share is None:
        pytest.skip("the page cache cannot be probed here (no cachestat or mincore)")
    return folder


def test_cached_after_drop_tells_a_tmpfs_from_a_disk(tmp_path):
    """Cold means the weight files were dropped from the page cache; on a tmpfs the drop does nothing."""
    import shutil

    from hf_layerstream._measure import cached_after_drop

    folder = _tmpfs_dir()
    try:
        held = os.path.join(folder, "blob")
        with open(held, "wb") as f:
            f.write(b"\1" * (3 * 2**20))
        assert cached_after_drop([held]) == 1.0
    finally:
        shutil.rmtree(folder)
    on_disk = tmp_path / "blob"
    on_disk.write_bytes(b"\1" * (3 * 2**20))  # (just written: dirty pages, which a drop alone leaves cached)
    share = cached_after_drop([on_disk])
    if share > 0.5:
        pytest.skip(f"{tmp_path} keeps dropped files cached too (a tmpfs?)")
    assert share < 0.1


def test_cold_rows_on_a_tmpfs_are_marked_cached(tmp_path, capsys, checkpoints):
    """'cold' drops the weight files from the page cache before every step; on a tmpfs they stay in memory, and the
    row was reported as a cold read from the disk, held to the disk's limit."""
    import shutil

    _, shards = checkpoints("llama")
    folder = _tmpfs_dir()
    try:
        source = shutil.copytree(shards, os.path.join(folder, "shards"))
        argv = ["bench", source, "--work", str(tmp_path / "w"), "--device", "cpu", "--systems", "streamed_disk"]
        argv += ["--modes", "warm,cold", "--max-new-tokens", "2", "--prompt-tokens", "4", "--json"]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
    finally:
        shutil.rmtree(folder)
    rows = {r["mode"]: r for r in report["rows"]}
    cold = rows["cold"]
    assert cold["cold_cached"] is True and cold["cold_cached_share"] == 1.0
    assert cold["target"] is None  # (not held to the disk's limit: it did not read from the disk)
    assert rows["warm"]["cold_cached"] is False and "cold_cached_share" not in rows["warm"]
    table = format_report(report)
    line = next(li for li in table.splitlines() if li.startswith(cold["label"]) and " cold " in li)
    assert " cold (cached) " in line and "1.15" not in line
    assert (
        "cold (cached): after the drop from the page cache, 100% of the weight files' bytes stayed cached (a" in table
    )


def test_peak_rss_can_be_set_back():
    from hf_layerstream._measure import reset_peak_rss, vm_hwm

    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    block = bytearray(256 * 2**20)  # touched: resident
    peak = vm_hwm()
    del block
    assert reset_peak_rss()
    assert vm_hwm() < peak - 128 * 2**20


@pytest.mark.parametrize("way", ["O_DIRECT", "read-ahead into a huge-page map, 2 files at once"])
def test_cold_steps_are_paired_with_reads_of_their_bytes(tmp_path, way):
    """Cold, each decode step of ours is compared with a read of the layer files it streams, sampled just before it
    (the disk's bandwidth moves between runs on a shared machine); the step includes its wait for the read-ahead, and
    the samples' reads are not counted as the model's."""
    from hf_layerstream._measure import drop_page_cache, measure, weight_files
    from hf_layerstream.bench import disk_ways
    from hf_layerstream.demo import write_demo_checkpoint
    from hf_layerstream.split import split_checkpoint

    if way not in disk_ways(files=3):
        pytest.skip(f"{way!r} is not available here")
    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=3, hidden_size=256, intermediate_size=512, vocab_size=256, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    layer_bytes = sum(p.stat().st_size for p in (shards / "layers").glob("*.safetensors"))
    spec = {"system": "streamed", "path": str(shards), "max_memory": {"cpu": 0}, "input_ids": [5, 6, 7, 8]}
    spec.update(max_new_tokens=4, cold=True, keep_in_page_cache=False)
    os.sync()
    drop_page_cache(weight_files("streamed", str(shards)))
    plain = measure(spec)
    paired = measure({**spec, "disk_way": way})
    assert "paired_disk" not in plain
    if "paired_disk" not in paired:
        pytest.skip("the peak RSS cannot be set back here")
    pd = paired["paired_disk"]
    assert pd["way"] == way and pd["files"] == 3 and pd["bytes_per_sweep"] == layer_bytes
    assert len(pd["ratios"]) == len(pd["steps_s"]) == len(pd["sample_bandwidth"]) == 3  # the decode steps
    assert all(r > 0 for r in pd["ratios"]) and all(b > 0 for b in pd["sample_bandwidth"])
    for step, bandwidth, ratio in zip(pd["steps_s"], pd["sample_bandwidth"], pd["ratios"]):
        assert ratio == pytest.approx(step * bandwidth / layer_bytes)
    # the row's seconds per token are the paired steps (with their waits)
    assert paired["s_per_token"] == sorted(pd["steps_s"])[len(pd["steps_s"]) // 2]
    assert paired["tokens"] == plain["tokens"]
    if plain["disk_read_bytes"] and plain["disk_read_bytes"] >= layer_bytes:  # reads are accounted, files dropped
        # the samples read every layer file once per step besides the model's own reads: not counted as the model's
        assert paired["disk_read_bytes"] < plain["disk_read_bytes"] + layer_bytes


def test_cold_pairing_of_a_single_streamed_file_reads_it_alone(tmp_path):
    """The fastest way may read two files at once; a model streaming one layer file is paired with that way reading
    one file."""
    from hf_layerstream._measure import measure
    from hf_layerstream.demo import write_demo_checkpoint
    from hf_layerstream.split import split_checkpoint

    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=1, hidden_size=256, intermediate_size=512, vocab_size=256, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    spec = {"system": "streamed", "path": str(shards), "max_memory": {"cpu": 0}, "input_ids": [5, 6, 7, 8]}
    spec.update(max_new_tokens=3, cold=True, keep_in_page_cache=False, disk_way="O_DIRECT, 2 files at once")
    result = measure(spec)
    if "paired_disk" not in result:
        pytest.skip("the peak RSS cannot be set back here")
    assert result["paired_disk"]["way"] == "O_DIRECT" and result["paired_disk"]["files"] == 1
    assert len(result["paired_disk"]["ratios"]) == 2
    # the share of CPU time stolen over the timed steps, the paired reads apart (`None` for steps under a clock tick)
    assert result["cpu_steal_share"] is None or 0 <= result["cpu_steal_share"] <= 1


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
        assert out["spread"][name] == [per_call[0], per_call[2]]  # (3 calls: the quartiles are the extremes)
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


def _cuda_plan(device=(), host=(), streamed=(), layers=4, layer=100, prefetch=2):
    return {
        "device_layers": list(device),
        "host_layers": list(host),
        "streamed": list(streamed),
        "prefetch": prefetch,
        "layer_bytes": [layer] * layers,
    }


def test_cuda_rows_are_held_to_the_host_to_device_limit_and_gpu_memory():
    """On CUDA the limit of decoding from host RAM is the copy to the device, and the GPU memory peak may hold the
    resident parts, the kept layers, (prefetch + 1) layers in flight and what the whole model needs beyond its
    weights (KV cache, activations), measured in the same run (synthetic rows: the arithmetic on every field)."""

    from hf_layerstream.bench import CUDA_HOST_TARGET, WARM_RESIDENT_TARGET, WARM_TARGET, _derive, paired_targets

    layer, resident = 100, 50
    extra = 30  # the whole model's peak beyond its weights
    rows = [
        {"system": "in_memory", "mode": "warm", "s_per_token": 0.01, "cuda_peak": resident + 4 * layer + extra},
        {"system": "streamed_host", "mode": "warm", "s_per_token": 0.05, "cuda_peak": resident + 3 * layer + extra},
        {"system": "streamed", "mode": "warm", "s_per_token": 0.0101, "cuda_peak": resident + 4 * layer + extra},
        {"system": "streamed_disk", "mode": "warm", "s_per_token": 0.2, "cuda_peak": resident + 3 * layer + extra + 1},
        {"system": "streamed_disk", "mode": "cold", "s_per_token": 0.3, "cuda_peak": resident + 2 * layer},
    ]
    plans = {
        "streamed_host": _cuda_plan(host=range(4)),
        "streamed": _cuda_plan(device=range(4)),
        "streamed_disk": _cuda_plan(streamed=range(4)),
    }
    for r in rows:
        r.update(batch=1, tokens=[1, 2], peak_rss=10**9, baseline_rss=10**8)
        if r["system"] in plans:
            r["plan_data"] = plans[r["system"]]
    h2d = {"bandwidth": 4 * layer / 0.04, "bytes": 2**20, "samples": [1.0, 2.0], "seconds": 1.0}
    disk = {"bandwidth": 4 * layer / 0.25}
    _derive(rows, disk, [layer] * 4, 10**8, resident, layer, None, h2d)
    ref, host, kept, disk_warm, disk_cold = rows

    assert host["h2d_bytes_per_sweep"] == 4 * layer and host["h2d_limit_s"] == pytest.approx(0.04)
    assert host["limit_s"] == pytest.approx(0.04) and host["ratio_to_limit"] == pytest.approx(1.25)
    assert host["target"] == CUDA_HOST_TARGET
    assert host["cuda_kv_and_activations"] == extra
    assert host["cuda_allowed"] == resident + 3 * layer + extra  # nothing kept on the device, 3 layers in flight
    # everything on the device: nothing crosses, the compute is the limit
    assert kept["h2d_bytes_per_sweep"] == 0 and kept["h2d_limit_s"] is None
    assert kept["limit_s"] == pytest.approx(0.01) and kept["target"] == WARM_RESIDENT_TARGET
    assert kept["cuda_allowed"] == resident + 4 * layer + extra
    # warm from the page cache on a GPU: the copy is the limit, no target (the issue sets one for host RAM)
    assert disk_warm["limit_s"] == pytest.approx(0.04) and disk_warm["target"] is None
    assert disk_warm["same_tokens"] is True
    # cold: the disk, as on CPU
    assert disk_cold["limit_s"] == pytest.approx(0.25) and disk_cold["h2d_limit_s"] == pytest.approx(0.04)
    # a small GPU's plan (`--max-memory 0=...`): the head kept in host RAM crosses at every sweep, and the GPU holds
    # the resident parts left there and, while the head runs, its copy beside the layers read ahead
    small = {"system": "streamed", "mode": "warm", "s_per_token": 0.06, "cuda_peak": 10, "batch": 1, "tokens": [1, 2]}
    head = 4 * layer  # larger than a layer
    small["plan_data"] = {
        **_cuda_plan(host=range(4)),
        "host_resident": ["input_embeddings", "output_embeddings"],
        "resident_bytes": 5,
        "host_resident_copied": head,
    }
    _derive([dict(ref), small], disk, [layer] * 4, 10**8, resident, layer, None, h2d)
    assert small["h2d_bytes_per_sweep"] == 4 * layer + head
    assert small["h2d_limit_s"] == pytest.approx((4 * layer + head) / h2d["bandwidth"])
    assert small["cuda_allowed"] == 5 + head + 2 * layer + extra
    # host RSS is not held to the CPU allowance on CUDA (the CUDA runtime's libraries arrive after the baseline)
    assert all("rss_allowed" not in r for r in rows)

    report = {
        "model": {"num_layers": 4, "layer_file_bytes": 4 * layer, "resident_bytes": resident, "prompt_tokens": 4},
        "disk": None,
        "h2d": h2d,
        "baseline_rss": 10**8,
        "rows": rows,
    }
    report["model"]["max_new_tokens"] = 3
    text = format_report(report)
    assert "pinned host-to-device bandwidth:" in text
    notes = {line.split(":")[0]: line for line in text.splitlines() if "CUDA peak" in line and "allowed" in line}
    assert notes["hf_layerstream (every layer in host RAM) warm"].endswith("(ok)")
    assert notes["hf_layerstream (every layer from disk) warm"].endswith("(over)")
    assert "<=1.20" not in text  # 1.25x the limit: short of the target, and the table says so
    assert ">1.20" in text
    # warm in one process, against the whole model on the GPU: the budget keeping every layer is held to 1.05x; every
    # layer from disk to none (its limit is the copy; it was held to the CPU's 1.10x and shown "short" at 4.9x)
    paired = {
        "members": ["in_memory", "streamed", "streamed_disk"],
        "calls": {"in_memory": [0.01] * 4, "streamed": [0.0108] * 4, "streamed_disk": [0.049] * 4},
        "s_per_token": {"in_memory": 0.01, "streamed": 0.0108, "streamed_disk": 0.049},
        "ratios": {"streamed": 1.08, "streamed_disk": 4.9},
        "spread": {"streamed": [1.06, 1.12], "streamed_disk": [4.8, 5.0]},
        "same_tokens": {"streamed": True, "streamed_disk": True},
    }
    paired["targets"] = paired_targets(paired, rows, on_cuda=True)
    assert paired["targets"] == {"streamed": WARM_RESIDENT_TARGET, "streamed_disk": None}
    # the disk row failed in its own process (e.g. timed out): its error row says nothing of its plan, and gave 1.10x
    failed = {"system": "streamed_disk", "mode": "warm", "batch": 1, "error": "timed out", "s_per_token": None}
    with_failed = [r for r in rows if (r["system"], r["mode"]) != ("streamed_disk", "warm")] + [failed]
    _derive(with_failed, disk, [layer] * 4, 10**8, resident, layer, None, h2d)
    assert paired_targets(paired, with_failed, on_cuda=True) == {
        "streamed": WARM_RESIDENT_TARGET,
        "streamed_disk": None,
    }
    assert paired_targets(paired, with_failed, on_cuda=False)["streamed_disk"] == WARM_TARGET
    lines = format_report({**report, "paired": paired}).splitlines()
    budget = next(li for li in lines if li.startswith("  hf_layerstream (budget): "))
    from_disk = next(li for li in lines if li.startswith("  hf_layerstream (every layer from disk): "))
    assert "1.08x" in budget and "target <= 1.05: short" in budget
    assert "4.90x" in from_disk and "no target" in from_disk and "short" not in from_disk


def test_cuda_only_rows_are_skipped_on_cpu(tmp_path, capsys):
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--max-new-tokens", "2", "--prompt-tokens", "4"]
    argv += ["--systems", "streamed_host,streamed_disk", "--modes", "warm", "--device", "cpu", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["system"] for r in report["rows"]] == ["streamed_disk"] and report["h2d"] is None


@pytest.mark.cuda
def test_h2d_bandwidth_on_cuda():
    from hf_layerstream.bench import measure_h2d_bandwidth

    out = measure_h2d_bandwidth("cuda", nbytes=64 * 2**20, repeats=3)
    assert out["bytes"] == 64 * 2**20 and len(out["samples"]) == 3
    assert out["bandwidth"] == max(out["samples"]) and out["bandwidth"] > 1e9  # any PCIe link moves > 1 GB/s


@pytest.mark.cuda
@pytest.mark.timeout(300)  # (seven child processes, each starting CUDA: over 90 s on the lent H200)
def test_bench_on_cuda_streams_from_host_ram_and_disk(tmp_path, capsys):
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--max-new-tokens", "3", "--prompt-tokens", "8"]
    argv += ["--systems", "in_memory,streamed,streamed_disk,streamed_host", "--device", "cuda", "--json"]
    argv += ["--paired-calls", "0"]  # (the paired warm comparison is the CPU targets'; here it would only cost time)
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["h2d"]["bandwidth"] > 1e9
    rows = {(r["system"], r["mode"]): r for r in report["rows"]}
    files = report["model"]["layer_file_bytes"]
    for system in ("streamed_disk", "streamed_host"):
        warm = rows[(system, "warm")]
        assert warm["same_tokens"] is True and warm["cuda_peak"] > 0
        assert warm["h2d_bytes_per_sweep"] == files  # every layer crosses to the device at every sweep
        assert warm["cuda_peak"] <= warm["cuda_allowed"]
    assert rows[("streamed_host", "warm")]["target"] == 1.2
    assert rows[("streamed", "warm")]["h2d_bytes_per_sweep"] == 0  # the default budget keeps a tiny model on the GPU
    assert rows[("streamed_disk", "cold")]["same_tokens"] is True


def test_baseline_of_quantized_shards_includes_their_codec(checkpoints):
    """The baseline every system's peak RSS is measured from holds the code that system loads before any weight:
    for quantized shards that includes bitsandbytes (70-114 MiB here), not only torch and transformers."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    _, full = checkpoints("llama")
    _, packed = checkpoints("llama", compression="4bit")
    probe = "import sys; from hf_layerstream._measure import _baseline_rss; _baseline_rss(sys.argv[1]); "
    probe += "print('bitsandbytes' in sys.modules)"
    seen = {}
    for name, path in (("full", full), ("4bit", packed)):
        out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
        seen[name] = out.stdout.strip().splitlines()[-1]
    assert seen == {"full": "False", "4bit": "True"}


def _gpu_not_queried_here(monkeypatch) -> None:
    """Asking this process's CUDA runtime for the GPU's free memory or bandwidth fails the test: the bench asks a
    child of its own (`_probe_cuda`)."""
    import torch

    from hf_layerstream import bench as bench_module

    def not_here(*args, **kwargs):
        raise AssertionError("the bench's own process queried the GPU")

    monkeypatch.setattr(torch.cuda, "mem_get_info", not_here)
    monkeypatch.setattr(bench_module, "measure_h2d_bandwidth", not_here)


def test_bench_asks_every_system_for_the_gpu_on_cuda(tmp_path, monkeypatch, capsys):
    """What each child is asked to do on a CUDA machine (none here: the children are not run): the reference and
    accelerate's offload compute on the GPU, the every-layer-from-disk row keeps nothing on the device either, the
    pinned-RAM row keeps nothing on the device and every layer in host RAM."""
    import torch

    from hf_layerstream import _measure
    from hf_layerstream import bench as bench_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    h2d = {"bandwidth": 1e10, "bytes": 2**20, "seconds": 1e-4, "samples": [1e10]}
    # the GPU's free memory and bandwidth are measured in a child of their own, not in this process (where a CUDA
    # context would stay for the whole run, taken from every child's default budget)
    _gpu_not_queried_here(monkeypatch)
    probes = []

    def fake_run_child(spec, timeout=None):
        probes.append(spec)
        return {"free": 80 * 2**30, "total": 80 * 2**30, "h2d": h2d}

    monkeypatch.setattr(_measure, "run_child", fake_run_child)
    specs = []

    def fake_run(spec, timeout):
        specs.append(spec)
        return {"system": spec["system"], "batch": 1, "error": "not run here", "s_per_token": None, "tokens": None}

    monkeypatch.setattr(bench_module, "_run", fake_run)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--modes", "warm", "--paired-calls", "0"]
    argv += ["--systems", "in_memory,accelerate_offload,streamed_disk,streamed_host"]
    assert main(argv) == 1  # (every row failed: not run here)
    by_system = {}
    for spec in specs:
        by_system.setdefault(spec["system"], []).append(spec)
    assert probes == [{"system": "cuda_probe", "device": "cuda:0"}]
    assert sorted(by_system) == ["accelerate_offload", "in_memory", "streamed"]
    assert [s["device"] for s in by_system["in_memory"]] == ["cuda:0"]
    assert [s["offload_device"] for s in by_system["accelerate_offload"]] == [0]
    # every layer from disk: nothing kept on the host or the GPU; every layer in host RAM: nothing on the GPU
    assert [s["max_memory"] for s in by_system["streamed"]] == [{"cpu": 0, "0": 0}, {"0": 0}]
    captured = capsys.readouterr()
    out = captured.out
    assert (
        "pinned host-to-device bandwidth: 10.00 GB/s" in out and "hf_layerstream (every layer in host RAM) warm " in out
    )
    assert out.count("failed: not run here") == 4
    assert "hf-layerstream bench: 4 measurement(s) failed: in_memory warm batch 1: not run here" in captured.err


def _weights_bytes(shard_dir) -> int:
    """The bytes of a shard directory's weights at their dtypes: what the whole model in memory would take."""
    shards = ShardDirectory(shard_dir)
    layers = (shards.unit(f"layers.{i}").logical_nbytes for i in range(shards.num_layers))
    return shards.unit("resident").logical_nbytes + sum(layers)


def _children_asked(monkeypatch) -> list[str]:
    """The systems the bench asks its children to measure, in order (the children are not run: each row fails)."""
    from hf_layerstream import bench as bench_module

    asked = []

    def fake_run(spec, timeout):
        asked.append(spec["system"])
        return {"system": spec["system"], "batch": 1, "error": "not run here", "s_per_token": None, "tokens": None}

    monkeypatch.setattr(bench_module, "_run", fake_run)
    return asked


@pytest.mark.parametrize("failing", [None, "streamed", "paired"])
def test_bench_exits_1_when_a_measurement_failed(tmp_path, monkeypatch, capsys, failing):
    """A row (or the warm run in one process) that failed is shown as 'failed: ...' in the table; the bench printed
    it and exited 0, as if the benchmark had succeeded. The children are not run: each answers a row."""
    from hf_layerstream import bench as bench_module

    def fake_run(spec, timeout):
        if spec["system"] == failing:
            return {"system": spec["system"], "batch": 1, "error": "boom", "s_per_token": None, "tokens": None}
        if spec["system"] == "paired":
            calls = {m["name"]: [0.1, 0.1] for m in spec["members"]}
            return {
                "members": list(calls),
                "calls": calls,
                "s_per_token": {name: 0.1 for name in calls},
                "ratios": {"streamed_disk": 1.0},
                "spread": {"streamed_disk": [1.0, 1.0]},
                "tokens": {name: [7, 8] for name in calls},
            }
        return {"system": spec["system"], "batch": 1, "s_per_token": 0.1, "tokens": [7, 8], "peak_rss": 10**9}

    monkeypatch.setattr(bench_module, "_run", fake_run)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--modes", "warm", "--paired-calls", "2"]
    argv += ["--systems", "in_memory,streamed_disk", "--device", "cpu"]
    status = main(argv)
    captured = capsys.readouterr()
    if failing is None:
        assert status == 0 and "failed" not in captured.out + captured.err
        assert "warm, in one process, alternating generate calls (2 each" in captured.out
        return
    assert status == 1
    assert "failed: boom" in captured.out
    what = "streamed_disk warm batch 1" if failing == "streamed" else "warm, in one process"
    assert f"hf-layerstream bench: 1 measurement(s) failed: {what}: boom" in captured.err


def test_rows_of_a_quantized_source_report_token_agreement_not_exactness(tmp_path, monkeypatch, capsys, checkpoints):
    """SOURCE a 4-bit shard directory, with the checkpoint as reference: its rows are lossy. They were held to the
    whole model's tokens exactly (a 'NO', and exit 1, for what quantization does), under full-precision labels, and the
    model info did not say the shards were quantized. The children are not run: ours answer other tokens."""
    from hf_layerstream import bench as bench_module

    ckpt, packed = checkpoints("llama", compression="4bit")

    def fake_run(spec, timeout):
        tokens = [7, 8, 9, 10] if spec["system"] == "in_memory" else [7, 8, 1, 10]
        if spec["system"] == "paired":
            names = [m["name"] for m in spec["members"]]
            calls = {name: [0.1, 0.1] for name in names}
            return {
                "members": names,
                "calls": calls,
                "s_per_token": {name: 0.1 for name in names},
                "ratios": {name: 1.0 for name in names[1:]},
                "spread": {name: [1.0, 1.0] for name in names[1:]},
                "tokens": {name: [7, 8, 9, 10] if name == "in_memory" else [7, 8, 1, 10] for name in names},
            }
        return {"system": spec["system"], "batch": 1, "s_per_token": 0.1, "tokens": tokens, "peak_rss": 10**9}

    monkeypatch.setattr(bench_module, "_run", fake_run)
    argv = ["bench", str(packed), "--checkpoint", str(ckpt), "--work", str(tmp_path), "--device", "cpu"]
    argv += ["--systems", "in_memory,streamed,streamed_disk", "--modes", "warm", "--paired-calls", "2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["compression"] == ShardDirectory(packed).compression
    assert report["model"]["compression"]["bits"] == 4
    rows = {r["system"]: r for r in report["rows"]}
    for system, label in (("streamed", "budget"), ("streamed_disk", "every layer from disk")):
        assert rows[system]["same_tokens"] is None and rows[system]["token_agreement"] == 0.75
        assert rows[system]["label"] == f"hf_layerstream ({label}), 4bit nf4 shards"
    assert rows["in_memory"]["label"] == "transformers, whole model in RAM"
    assert "token_agreement" not in rows["in_memory"]
    paired = report["paired"]
    assert paired["same_tokens"] == {} and paired["token_agreement"] == {"streamed": 0.75, "streamed_disk": 0.75}
    # the table says so, in the labels, the same column and the paired lines
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shards quantized (4bit nf4): lossy" in out
    line = next(li for li in out.splitlines() if li.startswith("hf_layerstream (every layer from disk), 4bit nf4"))
    assert line.endswith(" 75%") and "NO" not in out and "DIFFERENT TOKENS" not in out
    assert "  hf_layerstream (budget), 4bit nf4 shards: 0.100 s/token" in out
    assert "greedy tokens agreeing with the whole model's: 75%" in out


def test_a_quantized_source_refuses_compression_rows(tmp_path, capsys, checkpoints):
    """`--compression` puts quantized rows beside full-precision ones; from a quantized SOURCE, its 'full precision'
    rows would have been 4-bit ones."""
    ckpt, packed = checkpoints("llama", compression="4bit")
    argv = ["bench", str(packed), "--checkpoint", str(ckpt), "--work", str(tmp_path / "w"), "--device", "cpu"]
    assert main([*argv, "--systems", "streamed_disk", "--modes", "warm", "--compression", "8bit"]) == 2
    assert "is quantized itself (4bit nf4)" in capsys.readouterr().err
    assert not (tmp_path / "w" / "shards-8bit").exists()


@pytest.mark.parametrize("on_gpu", [False, True], ids=["host", "gpu"])  # (an id "cuda" would need a GPU)
def test_the_whole_model_is_measured_in_memory_only_where_it_fits(tmp_path, monkeypatch, caplog, on_gpu):
    """A model larger than RAM (or the GPU) is what streaming is for: the bench does not try to load it whole (a
    killed row, or the machine swapping), says why, and measures ours without the warm reference. The children are
    not run here; what they are asked to do is."""
    import logging

    import torch

    from hf_layerstream import bench as bench_module
    from hf_layerstream import engine

    free = {"bytes": 2**40}
    if on_gpu:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        h2d = {"bandwidth": 1e10, "bytes": 2**20, "seconds": 1e-4, "samples": [1e10]}
        _gpu_not_queried_here(monkeypatch)
        monkeypatch.setattr(
            bench_module, "_probe_cuda", lambda device, timeout: {"free": free["bytes"], "total": 2**40, "h2d": h2d}
        )
    else:
        monkeypatch.setattr(engine, "available_host_memory", lambda: free["bytes"])
    asked = _children_asked(monkeypatch)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--modes", "warm", "--paired-calls", "0"]
    argv += ["--systems", "in_memory,streamed_disk", "--json"]
    assert main(argv) == 1  # (the rows failed: not run here)
    assert asked == ["in_memory", "streamed"]
    whole = _weights_bytes(tmp_path / "shards")
    asked.clear()
    free["bytes"] = int(whole / bench_module.FIT_SHARE) - 1  # just too little
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(argv) == 1
    assert asked == ["streamed"]
    assert "skipping the whole model in memory (in_memory)" in caplog.text
    assert f"their weights ({whole / 1e9:.2f} GB) are more than 90%" in caplog.text


def test_the_warm_run_in_one_process_needs_room_for_two_models(tmp_path, monkeypatch, caplog):
    """The paired warm run holds the whole model and ours (whose budget plan keeps every layer that fits) in one
    process: on CPU it runs only where both fit; the whole model alone is still measured."""
    import logging

    from hf_layerstream import bench as bench_module
    from hf_layerstream import engine

    free = {"bytes": 2**40}
    monkeypatch.setattr(engine, "available_host_memory", lambda: free["bytes"])
    asked = _children_asked(monkeypatch)
    argv = ["bench", "--demo", *TINY, "--work", str(tmp_path), "--modes", "warm", "--paired-calls", "2"]
    argv += ["--systems", "in_memory,streamed,streamed_disk", "--device", "cpu"]
    assert main(argv) == 1  # (the rows failed: not run here)
    assert asked == ["in_memory", "streamed", "streamed", "paired"]
    whole = _weights_bytes(tmp_path / "shards")
    asked.clear()
    free["bytes"] = int(2 * whole / bench_module.FIT_SHARE) - 1  # one model fits, two do not
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(argv) == 1
    assert asked == ["in_memory", "streamed", "streamed"]
    assert "skipping the warm run in one process (--paired-calls), two models" in caplog.text
    asked.clear()  # every layer from disk beside the whole model: no second model
    assert main([*argv[:-4], "--systems", "in_memory,streamed_disk", "--device", "cpu"]) == 1
    assert asked == ["in_memory", "streamed", "paired"]


def test_a_disk_read_without_o_direct_is_not_named_o_direct(tmp_path, monkeypatch):
    """Where the system has no `O_DIRECT` (macOS) the bandwidth way named after it reads through the page cache, and
    its method says so (it said "O_DIRECT")."""
    from hf_layerstream.bench import _read_direct

    path = tmp_path / "f"
    path.write_bytes(b"x" * 3 * 4096)
    if hasattr(os, "O_DIRECT"):
        n, method = _read_direct([str(path)], 4096)
        assert n == 3 * 4096 and method in ("O_DIRECT", "buffered after POSIX_FADV_DONTNEED")
        monkeypatch.delattr(os, "O_DIRECT")
    assert _read_direct([str(path)], 4096) == (3 * 4096, "buffered (no O_DIRECT here)")


def test_a_peak_rss_that_could_not_be_read_is_not_held_to_the_allowance():
    """Where /proc/self/status cannot be read (macOS, a sandbox without /proc) the peak RSS reads 0: it shows as
    not measured ("-"), and no note says the row is within its allowance (one did, "0.00 GB ... (ok)")."""
    from hf_layerstream.bench import _derive

    layer, resident = 100, 50
    rows = [
        {"system": "in_memory", "mode": "warm", "s_per_token": 0.01},
        {"system": "streamed_disk", "mode": "warm", "s_per_token": 0.04, "plan_data": _cuda_plan(streamed=range(4))},
    ]
    for r in rows:
        r.update(batch=1, tokens=[1, 2], peak_rss=0, baseline_rss=0)
    _derive(rows, None, [layer] * 4, None, resident, layer, None)
    assert [r["peak_rss"] for r in rows] == [None, None] and "rss_allowed" not in rows[1]
    report = {
        "model": {"num_layers": 4, "layer_file_bytes": 4 * layer, "resident_bytes": resident, "prompt_tokens": 4},
        "disk": None,
        "baseline_rss": None,
        "rows": rows,
    }
    report["model"]["max_new_tokens"] = 3
    text = format_report(report)
    assert "peak RSS over baseline" not in text and "before loading): -" in text
    row = next(line for line in text.splitlines() if line.startswith("hf_layerstream (every layer from disk)"))
    assert "GB" not in row  # (the peak RSS column: "-")


def test_allowances_of_rows_dequantized_per_module_count_packed_layers_and_one_weight():
    """A row whose plan dequantizes per module holds its layers packed and one weight dequantized at a time: its RSS
    allowance (CPU) and GPU allowance (CUDA) count (prefetch + 1) packed layers plus that weight, not (prefetch + 1)
    layers at the compute dtype, and the notes name what they counted (synthetic rows: the arithmetic)."""
    from hf_layerstream.bench import RSS_SLACK, _derive

    layer, packed, scratch, resident, extra = 100, 30, 10, 50, 7
    plan = {**_cuda_plan(streamed=range(4), layer=packed, prefetch=1), "dequantize": "module", "scratch": scratch}
    by_layer = {**_cuda_plan(streamed=range(4), layer=layer, prefetch=1), "dequantize": "layer", "scratch": 0}

    def rows(cuda_peak=None):
        out = [
            {"system": "in_memory", "mode": "warm", "s_per_token": 0.01},
            {"system": "streamed_disk_4bit", "mode": "warm", "s_per_token": 0.05, "plan_data": plan},
            {"system": "streamed_disk", "mode": "warm", "s_per_token": 0.04, "plan_data": by_layer},
        ]
        for r in out:
            r.update(batch=1, tokens=[1, 2], peak_rss=10**9, baseline_rss=10**8, cuda_peak=cuda_peak)
        if cuda_peak is not None:
            out[0]["cuda_peak"] = resident + 4 * layer + extra  # the whole model: its weights, KV cache, activations
        return out

    report = {
        "model": {"num_layers": 4, "layer_file_bytes": 4 * layer, "resident_bytes": resident, "prompt_tokens": 4},
        "disk": None,
        "baseline_rss": 10**8,
    }
    report["model"]["max_new_tokens"] = 3
    stored = {"streamed_disk_4bit": [packed] * 4}

    cpu = rows()
    _derive(cpu, None, [layer] * 4, 10**8, resident, layer, stored)
    _, module, layered = cpu
    assert module["rss_allowed"] == pytest.approx(RSS_SLACK * (resident + 2 * packed + scratch))
    assert layered["rss_allowed"] == pytest.approx(RSS_SLACK * (resident + 2 * layer))
    text = format_report({**report, "rows": cpu})
    notes = {line.split(":")[0]: line for line in text.splitlines() if "peak RSS over baseline" in line}
    assert "(prefetch+1) packed layers + the largest dequantized weight" in notes[f"{module['label']} warm"]
    assert "x (resident + (prefetch+1) layers) =" in notes[f"{layered['label']} warm"]

    gpu = rows(cuda_peak=1)
    _derive(gpu, None, [layer] * 4, 10**8, resident, layer, stored)
    _, module, layered = gpu
    assert module["cuda_kv_and_activations"] == extra  # (the whole model's weights at the compute dtype)
    assert module["cuda_allowed"] == resident + 2 * packed + scratch + extra
    assert layered["cuda_allowed"] == resident + 2 * layer + extra
    text = format_report({**report, "rows": gpu})
    notes = {line.split(":")[0]: line for line in text.splitlines() if "CUDA peak" in line and "allowed" in line}
    assert "(prefetch+1) packed layers + the largest dequantized weight + KV cache" in notes[f"{module['label']} warm"]
    assert "(prefetch+1) layers + KV cache" in notes[f"{layered['label']} warm"]


def test_accelerates_offload_keeps_the_same_parts_in_memory_as_ours(tmp_path):
    """The peer's disk offload is placed as ours streams: every decoder layer on disk, the embeddings, final norm,
    head and rotary frequencies where the compute runs. (A 10 MiB "auto" budget put those on disk too, and
    accelerate read the embeddings and head from the disk at every token, which ours do not.) Same logits."""
    import _models
    from transformers.utils import is_accelerate_available

    from hf_layerstream._measure import _load

    if not is_accelerate_available():  # (transformers' own floor for device maps: above ours at the floors)
        pytest.skip("this transformers does not accept the installed accelerate for a device_map")
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    model, files = _load({"system": "accelerate_offload", "path": str(ckpt), "offload_folder": str(tmp_path / "off")})
    placed = model.hf_device_map
    assert {placed[f"model.layers.{i}"] for i in range(3)} == {"disk"}
    assert {d for n, d in placed.items() if not n.startswith("model.layers.")} == {"cpu"}
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(placed)
    assert files  # (what a cold run drops from the page cache)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _models.load_reference(ckpt, attn_implementation=None)(ids).logits)


def _two_layer_report(rows: list[dict], *, max_new_tokens: int) -> dict:
    """A report of `rows` measured on a 2-layer model of 10-byte layers (for `format_report`)."""
    model = {"num_layers": 2, "layer_file_bytes": 20, "resident_bytes": 5, "prompt_tokens": 4}
    return {"model": {**model, "max_new_tokens": max_new_tokens}, "disk": None, "baseline_rss": 0, "rows": rows}


def test_only_the_like_for_like_row_is_held_to_the_accelerate_target():
    """The 0.6x-of-accelerate target compares like with like: every layer from disk at full precision. A budget plan
    (layers kept in memory) and compressed shards (fewer bytes, lossy) get the ratio for information only."""
    from hf_layerstream.bench import _derive

    def row(system, spt, plan=True):
        r = {"system": system, "mode": "cold", "batch": 1, "s_per_token": spt, "tokens": [1], "peak_rss": 1}
        if plan:
            r["plan_data"] = {"device_layers": [], "host_layers": [], "streamed": [0, 1], "prefetch": 1}
            r["plan_data"]["layer_bytes"] = [10, 10]
        return r

    rows = [
        row("accelerate_offload", 1.0, plan=False),
        row("streamed_disk", 0.5),
        row("streamed", 0.4),
        row("streamed_disk_4bit", 0.2),
    ]
    _derive(rows, {"bandwidth": 100.0}, [10, 10], 0, 5, 10, {"streamed_disk_4bit": [3, 3]})
    report = _two_layer_report(rows, max_new_tokens=1)
    notes = [line for line in format_report(report).splitlines() if "accelerate's cold disk offload" in line]
    assert len(notes) == 3
    assert "0.50x accelerate's cold disk offload (target <= 0.6: ok)" in notes[0]
    assert all(n.endswith("(for information: not the target's like-for-like row)") for n in notes[1:])


def test_paths_that_are_not_there_are_refused_before_measuring(tmp_path, capsys, checkpoints):
    """A SOURCE or `--checkpoint` that reads as a local path but is not a folder went to the hub as a repo id ("Repo
    id must be in the form ...", or offline a connection error), `--checkpoint` only after the rows measured before
    it; `--assistant` a shard directory failed in every assisted child. All refused first, exit 2."""
    ckpt, shards = checkpoints("llama")
    quick = ["--systems", "streamed", "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]
    work = ["--work", str(tmp_path / "work")]
    for argv, message in (
        ([str(tmp_path / "nope")], f"SOURCE '{tmp_path / 'nope'}' is neither an existing local folder nor a hub"),
        ([str(ckpt / "config.json")], "config.json' is neither an existing local folder nor a hub repo id"),
        ([str(shards), "--checkpoint", str(tmp_path / "gone")], "`--checkpoint` '"),
        ([str(shards), "--assistant", str(shards)], "is a shard directory; the draft model is loaded whole"),
    ):
        assert main(["bench", *argv, *work, *quick]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (tmp_path / "work").exists()
    # a `--checkpoint` that is a folder but no checkpoint, or a hub repo that cannot be fetched: refused before any row
    # is measured (they failed the rows that load it, in their child processes, after the streamed rows)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def offline(repo_id, *args, **kwargs):
        raise LocalEntryNotFoundError(f"{repo_id} is not in the hub cache and the hub cannot be reached")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(huggingface_hub, "hf_hub_download", offline)
        unreachable = "Cannot fetch config.json of 'nobody/nothing': the hub cannot be reached"
        for checkpoint, message in (
            (str(tmp_path), "holds no config.json: it is not a checkpoint"),
            ("nobody/nothing", f"`--checkpoint` 'nobody/nothing' is no local folder ({tmp_path}/nobody/nothing"),
            ("nobody/nothing", unreachable),
        ):
            m.chdir(tmp_path)
            assert main(["bench", str(shards), "--checkpoint", checkpoint, *work, *quick]) == 2, checkpoint
            captured = capsys.readouterr()
            assert message in captured.err and "s/token" not in captured.out, checkpoint
        # a hub id as SOURCE alike: it was huggingface_hub's own error ("Got: ConnectError: ... An error happened
        # while trying to locate the files on the Hub"), naming no option and no fix
        assert main(["bench", "nobody/nothing", *work, *quick]) == 2
        err = capsys.readouterr().err
        assert "SOURCE 'nobody/nothing' is no local folder" in err and unreachable in err
        assert "pass a local checkpoint folder as SOURCE" in err

    def no_repo(repo_id, *args, **kwargs):
        raise RepositoryNotFoundError(f"404 for {repo_id}", response=types.SimpleNamespace(headers={}, request=None))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(huggingface_hub, "hf_hub_download", no_repo)
        assert main(["bench", "nobody/nothing", *work, *quick]) == 2
        assert "SOURCE 'nobody/nothing' is not a local folder and the hub has no such repo" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    # `generate --assistant` of a path not there: refused before the model loads (it went to the hub once loaded)
    assert main(["generate", str(shards), "hi", "--assistant", str(tmp_path / "nope")]) == 2
    assert "is neither an existing local folder nor a hub repo id" in capsys.readouterr().err
    # `--tokenizer` alike (a hub repo-id error once the model had loaded; a file path went to the hub)
    for tokenizer in (tmp_path / "nope", ckpt / "config.json"):
        assert main(["generate", str(shards), "hi", "--tokenizer", str(tokenizer)]) == 2
        assert f"`--tokenizer` {tokenizer} is neither an existing local folder" in capsys.readouterr().err


def test_assisted_rows_are_compared_with_the_assisted_whole_model_and_a_failed_one_is_shown():
    """An assisted row was held to the whole model's plain decoding (a faster streamed assisted row read "1.76x, >1.05"
    beside an in-memory assisted row at 2.17x); a failed assisted row ended the report with `KeyError:
    'sweeps_per_token'`, losing every row measured. A cold row of a plan streaming nothing has no target."""
    from hf_layerstream.bench import _derive

    plan = {"device_layers": [0, 1], "host_layers": [], "streamed": [], "prefetch": 1, "layer_bytes": [10, 10]}

    def row(system, mode, spt, **extra):
        return {
            "system": system,
            "mode": mode,
            "batch": 1,
            "s_per_token": spt,
            "tokens": [1, 2],
            "peak_rss": 1,
            **extra,
        }

    rows = [
        row("in_memory", "warm", 0.10),
        row("streamed", "warm", 0.104, plan_data=plan),
        row("streamed", "cold", 0.104, plan_data=plan),
        row("in_memory", "warm, assisted", 0.05, sweeps_per_token=0.5),
        row("streamed", "warm, assisted", 0.051, sweeps_per_token=0.5, plan_data=plan),
        {
            "system": "streamed_disk",
            "mode": "warm, assisted",
            "batch": 1,
            "error": "boom",
            "s_per_token": None,
            "tokens": None,
            "peak_rss": None,
        },
    ]
    _derive(rows, {"bandwidth": 100.0}, [10, 10], 0, 5, 10)
    warm, cold, ref, assisted, failed = rows[1], rows[2], rows[3], rows[4], rows[5]
    assert warm["compute_s"] == 0.10 and assisted["compute_s"] == 0.05 == ref["compute_s"]
    assert assisted["ratio_to_limit"] == pytest.approx(1.02) and assisted["same_tokens"] is True
    assert cold["target"] is None and cold["bytes_per_sweep"] == 0
    text = format_report(_two_layer_report(rows, max_new_tokens=2))
    assert "failed: boom" in text and f"{assisted['label']} assisted: 0.50 sweeps per generated token" in text
    assert failed["label"] in text


def test_a_wait_the_eviction_reports_counts_in_the_step():
    """Cold runs drop the page cache between decode steps, untimed; for ours, the loader's reads ahead finish first
    (they must not go on, untimed, during the drop) and that wait is counted back into the step."""
    from hf_layerstream._measure import _TokenClock

    steps = {}
    for charged in (None, 0.25):
        clock = _TokenClock(lambda charged=charged: (time.sleep(0.05), charged)[1])
        for _ in range(4):  # the prompt's token, then three decode steps
            clock.put(torch.tensor([1]))
        steps[charged] = [s for s, _ in clock.decode_steps()]
    assert all(s < 0.05 for s in steps[None])  # the eviction itself is not timed
    assert all(0.25 <= s < 0.3 for s in steps[0.25])


def test_the_median_of_an_even_count_is_the_mean_of_its_middle_two():
    """The paired run's median of two ratios was the upper one ("median 3.73x, middle half 0.74x-3.73x")."""
    from hf_layerstream._measure import _median

    assert _median([3.73, 0.74]) == pytest.approx(2.235)
    assert _median([5.0, 1.0, 3.0]) == 3.0 and _median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_cpu_time_stolen_by_the_hypervisor_is_measured_over_the_timed_steps_and_reported():
    """On a VM the host can take CPU time from the guest (steal): here reading the layer files while both cores
    computed lost about 30% of the CPU time, and nothing computing or reading alone. A cold row's steps and the disk's
    measurement each record their share, and the report says when a cold row lost some."""
    from hf_layerstream._measure import _TokenClock, cpu_ticks, steal_share

    before = cpu_ticks()
    if before is None:
        pytest.skip("no /proc/stat here")
    time.sleep(0.05)
    after = cpu_ticks()
    assert 0 <= before[0] <= after[0] and before[1] < after[1]  # (every state counts: the sleep's idle time too)
    assert steal_share([((10, 100), (13, 200)), ((20, 300), (21, 400))]) == pytest.approx(4 / 200)
    assert steal_share([((0, 100), (0, 100))]) is None and steal_share([(None, (1, 2))]) is None

    clock = _TokenClock(lambda: time.sleep(0.01))
    for _ in range(4):  # the prompt's token, then three decode steps
        clock.put(torch.tensor([1]))
    spans = clock.step_ticks()
    assert len(spans) == len(clock.decode_steps()) == 2
    # each span runs from after the eviction to the next token: after the previous span's end
    assert all(start[1] <= end[1] for start, end in spans) and spans[0][1][1] <= spans[1][0][1]

    def row(mode, steal):
        r = {"system": "streamed_disk", "mode": mode, "batch": 1, "s_per_token": 0.5, "tokens": [1], "peak_rss": 1}
        r["plan_data"] = {"device_layers": [], "host_layers": [], "streamed": [0, 1], "prefetch": 1}
        r["plan_data"]["layer_bytes"] = [10, 10]
        return {**r, "cpu_steal_share": steal}

    disk = {"bandwidth": 100.0, "bytes": 20, "seconds": 0.2, "method": "O_DIRECT", "steal_samples": [0.0, 0.01]}
    for steal, shown in ((0.3, True), (0.01, False), (None, False)):
        rows = [row("cold", steal), row("warm", steal)]
        from hf_layerstream.bench import _derive

        _derive(rows, disk, [10, 10], 0, 5, 10)
        text = format_report({**_two_layer_report(rows, max_new_tokens=1), "disk": disk})
        note = f"{rows[0]['label']} cold: the hypervisor took 30% of this machine's CPU time during the timed decode"
        assert (note in text) is shown, steal
        assert ("steal: the hypervisor took CPU time" in text) is shown, steal
        if shown:
            assert "(up to 30%), against 0%, 1% while the disk bandwidth was measured" in text
            assert f"{rows[1]['label']} warm: the hypervisor took 30%" in text  # (each row says it)


def test_a_work_folder_that_cannot_be_one_is_a_one_line_error(tmp_path, capsys, checkpoints):
    """`bench --work FILE` printed "[Errno 17] File exists: ..." (and `demo --dir FILE` "[Errno 20] Not a directory"
    after its first step's line), naming no option."""
    _, shards = checkpoints("llama")
    (tmp_path / "file").write_text("")
    quick = ["--systems", "streamed", "--modes", "warm", "--paired-calls", "0", "--max-new-tokens", "2"]
    for work, message in (
        (tmp_path / "file", f"`--work` {str(tmp_path / 'file')!r} is a file; pass a folder."),
        (
            tmp_path / "file" / "w",
            f"`--work` {str(tmp_path / 'file' / 'w')!r} cannot be made a folder (Not a directory)",
        ),
    ):
        assert main(["bench", str(shards), "--work", str(work), *quick]) == 2
        assert message in capsys.readouterr().err
    assert main(["demo", "--dir", str(tmp_path / "file")]) == 2
    captured = capsys.readouterr()
    assert f"`--dir` {str(tmp_path / 'file')!r} is a file; pass a folder." in captured.err and not captured.out


def test_a_checkpoint_whose_model_does_not_build_is_a_one_line_error(tmp_path, capsys, checkpoints, monkeypatch):
    """`bench SHARDS --checkpoint C` builds C's model to compare it with the shards; where that build raised (a model
    this transformers cannot build as the class the shards were split for), the traceback came out."""
    ckpt, shards = checkpoints("llama")

    def fails(self, config):
        raise RuntimeError("no kernel for this model")

    monkeypatch.setattr(ShardDirectory, "model_mismatch", fails)
    argv = ["bench", str(shards), "--checkpoint", str(ckpt), "--work", str(tmp_path / "w"), "--modes", "warm"]
    assert main([*argv, "--systems", "in_memory,streamed", "--paired-calls", "0"]) == 2
    err = capsys.readouterr().err
    assert f"`--checkpoint` {str(ckpt)!r}: building its model (as the class SOURCE was split for) failed" in err
    assert "(RuntimeError: no kernel for this model)" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_tiny_models_memory_figures_are_shown_in_mb():
    """Figures below 0.1 GB show in MB: a tiny model's RSS note read "0.01 GB, allowed 0.00 GB (over)", which told
    neither figure."""
    from hf_layerstream.bench import _derive

    layer, resident = 2_000_000, 3_000_000
    rows = [
        {"system": "in_memory", "mode": "warm", "s_per_token": 0.01},
        {"system": "streamed_disk", "mode": "warm", "s_per_token": 0.04, "plan_data": _cuda_plan(streamed=range(4))},
    ]
    for r in rows:
        r.update(batch=1, tokens=[1, 2], peak_rss=500_000_000 + 12_345_678, baseline_rss=500_000_000)
    _derive(rows, None, [layer] * 4, None, resident, layer, None)
    report = {
        "model": {"num_layers": 4, "layer_file_bytes": 4 * layer, "resident_bytes": resident, "prompt_tokens": 4},
        "disk": None,
        "baseline_rss": 500_000_000,
        "rows": rows,
    }
    report["model"]["max_new_tokens"] = 3
    text = format_report(report)
    allowed = rows[1]["rss_allowed"]
    assert allowed < 1e8
    assert "peak RSS over baseline 12.3 MB, allowed" in text and f"= {allowed / 1e6:.1f} MB (over)" in text
    assert "baseline RSS (python + torch + transformers imported, before loading): 0.50 GB" in text


def test_bench_and_demo_take_compression_in_any_case():
    """`split --compression 4BIT` and `compression="4BIT"` are taken; bench's and demo's `--compression` refused it."""
    from hf_layerstream.bench import _parse_list
    from hf_layerstream.cli import build_parser

    assert _parse_list("4BIT, 8bit", ("4bit", "8bit"), "--compression") == ["4bit", "8bit"]
    assert build_parser().parse_args(["demo", "--compression", "4BIT"]).compression == "4bit"


def test_bench_compression_4bit_dq_splits_with_double_quant(tmp_path, checkpoints):
    """`--compression 4bit-dq`: the rows of 4-bit shards whose block scales are quantized too, named so."""
    from hf_layerstream.bench import COMPRESSIONS, _label, _parse_list, scheme_name, split_in_work

    assert _parse_list("4bit,4BIT-DQ", COMPRESSIONS, "--compression") == ["4bit", "4bit-dq"]
    ckpt, _ = checkpoints("llama")
    shards = ShardDirectory(split_in_work(ckpt, tmp_path / "shards-4bit-dq", **COMPRESSIONS["4bit-dq"]))
    assert shards.compression["bits"] == 4 and shards.compression["double_quant"] is True
    assert (
        scheme_name(shards.compression) == "4bit nf4 dq" and scheme_name({"bits": 4, "quant_type": "nf4"}) == "4bit nf4"
    )
    assert _label("streamed_disk_4bit-dq") == "hf_layerstream, 4bit-dq shards (from disk)"


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_library_rss_counts_shared_libraries_not_mapped_weights(tmp_path):
    """`_measure.library_rss`, which the peak-RSS tests leave out of a run's growth (library code the first pass pages
    in): the resident pages of `.so` mappings (torch's among them), not those of a weight file mapped and read."""
    from hf_layerstream._measure import library_rss, vm_rss

    before = library_rss()
    assert 0 < before <= vm_rss()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(os.urandom(8 * 2**20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert sum(mm[i] for i in range(0, len(mm), 4096)) >= 0  # (every page touched: resident)
        assert abs(library_rss() - before) < 2**20
