"""The loader: residency plans, sizes, errors surfacing in the caller, clean shutdown, profiles, peak memory."""

from __future__ import annotations

import ctypes
import errno
import functools
import gc
import io
import logging
import mmap
import os
import re
import shutil
import sys
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import _models
import pytest
import torch
from _pagecache import cached_share, drop_from_page_cache, drop_or_skip, map_cpu_per_mib, read_in_big_chunks
from conftest import anon_growth_under_autocast, build_meta_model, generate_from_threads, streamed_model
from transformers import AutoConfig, AutoTokenizer

from hf_layerstream import (
    LayerLoadError,
    ShardDirectory,
    ShardFileError,
    disable_layer_streaming,
    enable_layer_streaming,
    get_streaming_state,
    split_checkpoint,
)
from hf_layerstream.engine import _PinnedHost, _round_up, _spread, budget_shortfall, parse_size, plan_residency
from hf_layerstream.modeling import layer_unit

STREAM_ALL = {"max_memory": {"cpu": 0}, "prefetch": 1}
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}


def _loader_threads(loader=None) -> list[threading.Thread]:
    """Live loader threads: of `loader` only (other tests' models may be alive in this process), else all."""
    if loader is not None:
        return [t for t in loader._executor._threads if t.is_alive()]
    return [t for t in threading.enumerate() if t.name.startswith("hf_layerstream-loader") and t.is_alive()]


@pytest.fixture(scope="module")
def llama(checkpoints):
    """(checkpoint, shards, reference model, tokenizer inputs, reference tokens) for a 6-layer llama."""
    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    ref = _models.load_reference(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt")
    expected = ref.generate(**inputs, **GEN, pad_token_id=tok.pad_token_id)
    return ckpt, shards, inputs, expected, tok.pad_token_id


# --- sizes and plans ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (1234, 1234),
        (1.5e3, 1500),
        ("4GiB", 4 * 2**30),
        ("4 GiB", 4 * 2**30),
        ("500MB", 500 * 10**6),
        ("500MiB", 500 * 2**20),
        ("4gib", 4 * 2**30),  # (a lowercase b after an i: bytes, in accelerate too)
        ("1.5KiB", 1536),
        ("2K", 2000),
        ("3T", 3 * 10**12),
        ("7", 7),
        ("7B", 7),
        (".5KiB", 512),
        ("0.1GB", 10**8),
        ("4GB\n", 4 * 10**9),
        # exactly: a float's rounding (1e39 is not 10**39) or overflow (a 400-digit number: OverflowError) gone
        ("1" + "0" * 30 + "GB", 10**39),
        ("1" + "0" * 400, 10**400),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


def test_parse_size_takes_numpy_numbers_as_accelerate_does():
    """`np.int64` (a budget computed with NumPy) was refused with "use bytes (a non-negative int)"; `np.float64`, a
    float, was taken. As keys too. A number of bytes with a fraction (1.5, 1 byte) is refused, as "1.5" is."""
    from hf_layerstream.engine import check_max_memory

    np = pytest.importorskip("numpy")
    assert parse_size(np.int64(5 * 2**20)) == 5 * 2**20 and parse_size(np.float64(1.5e3)) == 1500
    with pytest.raises(ValueError, match="finite and non-negative"):
        parse_size(np.int64(-1))
    assert parse_size("1.0") == 1 and parse_size("3.") == 3 and parse_size(2.0) == 2  # (whole numbers of bytes)
    for value in (1.5, np.float64(0.25)):
        with pytest.raises(ValueError, match="a number is bytes, a whole number"):
            parse_size(value)
    check_max_memory({np.int64(0): "1GiB", "cpu": np.int64(2**30)})


@pytest.mark.parametrize("value", ["", "lots", "-1GiB", "4XB", "GiB", None, True, [4], -5, float("inf"), float("nan")])
def test_parse_size_errors_name_the_argument(value):
    # (a value of another type than a size's is a TypeError, one of a size's type that is not a size a ValueError)
    with pytest.raises(
        TypeError if value is None or isinstance(value, (bool, list)) else ValueError, match="max_memory"
    ):
        parse_size(value)


@pytest.mark.parametrize(
    "value, fix", [("500mb", "'500MB' for bytes, or '500MiB'"), ("1.5 Gb", "'1.5GB'"), ("7b", "'7B'")]
)
def test_a_lowercase_b_that_accelerate_reads_as_bits_is_refused(value, fix):
    """accelerate (`from_pretrained(max_memory=...)`) reads "500mb" as 500 megabits, an eighth of "500MB"; it was
    read as bytes here, so the same budget meant 8 times more memory. Refused, naming the spellings that say bytes."""
    with pytest.raises(
        ValueError, match=rf"`max_memory` got the size '{value}', whose lowercase b accelerate reads as"
    ):
        parse_size(value)
    with pytest.raises(ValueError, match=re.escape(fix)):
        parse_size(value)


@pytest.mark.parametrize(
    "value",
    [
        "1.2.3",  # (float's own message: "could not convert string to float")
        ".",
        "4iB",  # an i without a unit (was 4 bytes)
        "4i",
        "4\u212aB",  # the Kelvin sign, matched by K under IGNORECASE (was 4 bytes)
        "4\u0130B",  # the dotted capital I, matched by i (was 4 bytes)
        "4G\u0131B",  # the dotless i (was 4 GiB)
        "\u0664GB",  # an Arabic-Indic digit
        "4\xa0GB",  # a non-ASCII space
        "4GBx",
        "x4GB",
        "   ",
        "1_000",
        "1e3",
        "+4GB",
        "-0",
    ],
)
def test_parse_size_is_strict(value):
    """Only ASCII digits, one decimal point and a unit; the error says what a size looks like."""
    with pytest.raises(ValueError, match=r"`max_memory` got the size .*; use bytes \(a non-negative int\) or a string"):
        parse_size(value)


@pytest.mark.parametrize(
    "max_memory, match",
    [
        ({"gpu": "4GiB"}, "'gpu' is not recognized"),
        ({"cuda:0": "4GiB", "cpu": "1GiB"}, r"for cuda:0, the key is 0"),
        # (accelerate takes it for Apple's GPU; the message said to use what accelerate uses, as if it did not)
        ({"mps": "4GiB"}, r"'mps' is not recognized \(streaming runs on the CPU and on CUDA GPUs only\)"),
        ({-1: "4GiB"}, "-1 is not recognized"),
        ({"cpu": "1GiB", 1: "lots"}, "'lots'"),  # a size for a device the plan does not use is still a size
        ({"\u00b2": "1GiB"}, "is not recognized"),  # (a digit to `str.isdigit`, not an index)
        ({"00": "1MiB"}, r"'00' is not recognized \(the key is 0\)"),  # (was accepted, then looked up as 0: ignored)
        ({"cpu": "1.5"}, r"without a unit a size is bytes, a whole number; give a unit, e.g. '1.5GiB'"),  # (1 byte)
    ],
)
def test_max_memory_keys_and_sizes_are_checked(llama, max_memory, match, caplog):
    """As accelerate does: a misspelled key or a bad size is an error at enable time, not a budget silently ignored
    (the plan then built on the default share of free memory the caller meant to replace). A GPU's budget, on CPU, is
    accepted and ignored with a warning (it was ignored without a word)."""
    ckpt, shards, *_ = llama
    with pytest.raises(ValueError, match=match):
        streamed_model(ckpt, shards, max_memory=max_memory)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.engine"):
        plan = plan_residency(ShardDirectory(shards), torch.device("cpu"), max_memory={"disk": "1TB", "cpu": "1GiB"})
    assert plan.budgets["cpu"] > 0 and "ignored" not in caplog.text  # ('disk' is accepted, as accelerate's)
    budget = {"0": "1GiB", "disk": "1TB", 1: 1}
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.engine"):
        plan = plan_residency(ShardDirectory(shards), torch.device("cpu"), max_memory=budget)
    assert plan.budgets["cpu"] > 0  # GPU indices (int or digits) and 'disk' are accepted; on CPU they do not apply
    assert "`max_memory` gives a budget for GPU 0, 1, but the model streams on the CPU" in caplog.text


def test_prefetch_takes_numpys_integers_and_refuses_what_is_not_a_count(llama):
    """`prefetch=np.int64(1)` (a value from a NumPy sweep) was refused as "must be a non-negative int, got
    np.int64(1)", where `max_memory` takes NumPy's integers; it streams as 1 does now, its plan's `prefetch` a Python
    int (the plan's `to_dict()` stays JSON), and `inspect`'s plan is the same. Bools, floats, strings and negatives are
    still refused."""
    import json

    import numpy as np

    from hf_layerstream.stream import plan_shard_dir

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=np.int64(1))
    plan = get_streaming_state(model).plan
    assert type(plan.prefetch) is int and plan.prefetch == 1 and plan.streamed == list(range(6))
    assert json.loads(json.dumps(plan.to_dict()))["prefetch"] == 1
    assert get_streaming_state(model).loader.prefetch == 1
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    shown = plan_shard_dir(ShardDirectory(shards), torch.device("cpu"), prefetch=np.uint8(2), max_memory={"cpu": 0})
    assert type(shown.prefetch) is int and shown.prefetch == 2
    for bad in (True, 1.0, "2", -1, np.int64(-1)):
        wrong_type = isinstance(bad, (bool, float, str))  # (a negative int is a value out of range)
        with pytest.raises(TypeError if wrong_type else ValueError, match=r"`prefetch` must be a non-negative int"):
            streamed_model(ckpt, shards, prefetch=bad)


@pytest.mark.parametrize("on_gpu", [False, True])  # (a GPU's plan from its budget: no GPU needed)
def test_a_gpu_given_twice_as_an_int_and_as_its_digits_is_refused(on_gpu):
    """`{0: "1GiB", "0": "4GiB"}` (a JSON config's budget merged with a Python dict's) planned with the int's budget
    and ignored the other without a word, where `--max-memory 0=1GiB,0=4GiB` is refused; now it is refused too,
    naming the GPU and both keys. Other GPUs, each given once in either form, are accepted."""
    from conftest import shaped_shard_dir

    shards = shaped_shard_dir(4, 1000, 100)
    where = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    for budget in ({0: "1GiB", "0": "4GiB"}, {"1": 0, 0: "1GiB", 1: "1MiB"}):
        gpu = "0" if "0" in budget else "1"
        with pytest.raises(
            ValueError, match=rf"`max_memory` gives GPU {gpu} twice, as .* and .*: give its budget once"
        ):
            plan_residency(shards, where, max_memory=budget, keep_in_page_cache=False)
    plan = plan_residency(shards, where, max_memory={"0": "4GiB", 1: 0, "cpu": "1GiB"}, keep_in_page_cache=False)
    assert plan.budgets["cpu"] == 2**30 and (not on_gpu or plan.budgets["0"] == 4 * 2**30)


def test_a_budget_past_a_floats_range_plans_and_prints(llama, capsys):
    """`parse_size` takes a 400-digit size exactly; the plan's messages divided it by 2**30 as a float:
    `OverflowError` at enable and in `inspect` (a traceback, exit 1). It keeps every layer, as any budget that holds
    them does."""
    from hf_layerstream.cli import main
    from hf_layerstream.engine import size_text

    ckpt, shards, inputs, expected, pad = llama
    huge = "1" + "0" * 400
    assert size_text(10**400) == "1.00e+400 B" and size_text(3 * 2**30) == "3.00 GiB"
    model = streamed_model(ckpt, shards, max_memory={"cpu": huge}, prefetch=1)
    plan = get_streaming_state(model).plan
    assert plan.device_layers == list(range(6)) and size_text(10**400) in plan.summary()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", f"cpu={huge}"]) == 0
    assert "6 layers kept" in capsys.readouterr().out


def test_sizes_past_a_tebibyte_are_written_in_larger_units():
    """A budget given as "no limit" (`cpu=1000000000000000000000000000000`) was written as a number of GiB of 21
    digits and two decimals (931322574615478515625.00 GiB), and a 400-digit one as 391 digits: from 1 TiB up, TiB to
    YiB; past 1024 YiB, bytes as a power of ten. Below, as before."""
    from hf_layerstream.engine import size_text

    assert [size_text(n) for n in (2**20, 3 * 2**30, 2**40 - 2**30)] == ["1.0 MiB", "3.00 GiB", "1023.00 GiB"]
    assert [size_text(n) for n in (2**40, 1536 * 2**30, 3 * 2**50)] == ["1.00 TiB", "1.50 TiB", "3.00 PiB"]
    assert [size_text(2**60), size_text(2**70), size_text(5 * 2**80)] == ["1.00 EiB", "1.00 ZiB", "5.00 YiB"]
    assert size_text(10**30) == "1.00e+30 B" and size_text(2**1000) == "1.07e+301 B"
    assert size_text(float(2**41)) == "2.00 TiB"


def test_the_plan_summary_shows_prefetch_only_where_layers_are_read_ahead():
    """The summary showed `0 streamed from disk (prefetch 3)` with every layer kept, where nothing is read ahead; it
    shows the prefetch with the layers read ahead: streamed from the disk, or, on a GPU, copied from host RAM."""
    from conftest import shaped_shard_dir

    shards = shaped_shard_dir(4, 1000, 100)
    cpu = torch.device("cpu")
    kept = plan_residency(shards, cpu, max_memory={"cpu": 10**6}, prefetch=3, keep_in_page_cache=False)
    assert kept.device_layers == [0, 1, 2, 3] and "; 0 streamed from disk [budget" in kept.summary()
    assert "prefetch" not in kept.summary()
    streamed = plan_residency(shards, cpu, max_memory={"cpu": 0}, prefetch=3, keep_in_page_cache=False)
    assert "4 streamed from disk (prefetch 3)" in streamed.summary()
    gpu = torch.device("cuda", 0)  # (explicit budgets: no GPU needed)
    in_host = plan_residency(shards, gpu, max_memory={0: 0, "cpu": 10**6}, prefetch=2, keep_in_page_cache=False)
    assert in_host.host_layers == [0, 1, 2, 3] and not in_host.streamed
    assert "4 layers kept in pinned host RAM (prefetch 2); 0 streamed from disk [budget" in in_host.summary()
    on_gpu = plan_residency(shards, gpu, max_memory={0: 10**6, "cpu": 0}, prefetch=2, keep_in_page_cache=False)
    assert on_gpu.device_layers == [0, 1, 2, 3] and "prefetch" not in on_gpu.summary()
    mixed = plan_residency(shards, gpu, max_memory={0: 0, "cpu": 3500}, prefetch=1, keep_in_page_cache=False)
    assert len(mixed.host_layers) == 1 and len(mixed.streamed) == 3
    assert "1 layer kept in pinned host RAM; 3 streamed from disk (prefetch 1)" in mixed.summary()


def test_spread_picks_evenly():
    assert _spread(list(range(8)), 0) == []
    assert _spread(list(range(8)), 2) == [0, 4]
    assert _spread(list(range(8)), 4) == [0, 2, 4, 6]
    assert _spread(list(range(8)), 9) == list(range(8))
    assert _spread([1, 3, 5, 7], 2) == [1, 5]


def _sizes(shards):
    m = ShardDirectory(shards)
    return m, m.unit("resident").logical_nbytes, m.unit("layers.0").logical_nbytes


def test_plan_cpu_tiers(llama):
    _, shards, *_ = llama
    m, resident, layer = _sizes(shards)
    cpu = torch.device("cpu")
    everything = plan_residency(m, cpu, max_memory={"cpu": "100GiB"}, prefetch=2)
    assert everything.device_layers == list(range(6)) and everything.streamed == []
    nothing = plan_residency(m, cpu, max_memory={"cpu": 0}, prefetch=2)
    assert nothing.device_layers == [] and nothing.streamed == list(range(6))
    assert [nothing.tier(i) for i in range(6)] == ["disk"] * 6
    # resident parts + working set (prefetch + 1 layers) + exactly 3 kept layers, spread over the stack
    three = plan_residency(m, cpu, max_memory={"cpu": resident + 3 * layer + 2 * layer}, prefetch=1)
    assert three.device_layers == [0, 2, 4] and three.streamed == [1, 3, 5]
    assert three.tier(2) == "device" and three.tier(3) == "disk"
    assert "3 layers kept on cpu" in three.summary() and "3 streamed" in three.summary()
    one = plan_residency(m, cpu, max_memory={"cpu": resident + layer + 2 * layer}, prefetch=1)
    assert len(one.device_layers) == 1 and "; 1 layer kept on cpu;" in one.summary()  # ("1 layers kept" before)
    assert three.to_dict()["streamed"] == [1, 3, 5]
    with pytest.raises(TypeError, match="max_memory"):
        plan_residency(m, cpu, max_memory="4GiB")
    # the resident parts count at the dtype the model computes in, as the layers do: larger, one layer less fits
    budget = {"cpu": resident + 3 * layer + 2 * layer}
    bigger = plan_residency(m, cpu, max_memory=budget, prefetch=1, resident_size=resident + layer)
    assert bigger.resident_bytes == resident + layer and len(bigger.device_layers) == 2


def test_a_budget_that_holds_every_layer_keeps_them_all(llama):
    """No room is set aside for layers in flight when none need to be: a budget of exactly the resident parts and
    every layer keeps every layer (it kept `6 - prefetch - 1` and streamed the rest); a byte less streams some."""
    _, shards, *_ = llama
    m, resident, layer = _sizes(shards)
    cpu = torch.device("cpu")
    whole = resident + 6 * layer
    for prefetch in (0, 2):
        kept = plan_residency(m, cpu, max_memory={"cpu": whole}, prefetch=prefetch)
        assert kept.device_layers == list(range(6)) and kept.streamed == []
        assert budget_shortfall(kept, {"cpu": whole}) is None
        short = plan_residency(m, cpu, max_memory={"cpu": whole - 1}, prefetch=prefetch)
        assert len(short.device_layers) == 6 - prefetch - 1 - 1 and len(short.streamed) == prefetch + 2
    # dequantizing one module at a time needs its scratch besides every layer
    scratch = plan_residency(m, cpu, max_memory={"cpu": whole}, prefetch=1, scratch=1)
    assert scratch.streamed
    assert plan_residency(m, cpu, max_memory={"cpu": whole + 1}, prefetch=1, scratch=1).streamed == []


def test_plans_of_layers_of_different_sizes_stay_within_the_budget(llama):
    """Small layers first, large ones after (DeepSeek-V3's dense layers before its MoE ones): the count of layers that
    fit must not come from the small ones while the even spread picks large ones (it did: 12 units kept in a room of
    3). Every tier stays within its room, and keeps as much as the uniform rule would where it can."""
    _, shards, *_ = llama
    m, resident, _ = _sizes(shards)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    unit = 2**20
    sizes = {i: s * unit for i, s in enumerate([1, 1, 1, 10, 10, 10])}
    working = 10 * unit  # (prefetch + 1) of the largest layer, with prefetch=0

    def kept(plan, tier):
        return sum(sizes[i] for i in tier)

    for room, expected in [(3, [0, 1, 2]), (12, [0, 2, 4]), (13, [0, 1, 2, 4]), (22, [0, 1, 3, 4])]:
        budget = {"cpu": resident + working + room * unit}
        plan = plan_residency(m, cpu, dtype_size=sizes, max_memory=budget, prefetch=0)
        assert kept(plan, plan.device_layers) <= room * unit, (room, plan.device_layers)
        assert plan.device_layers == expected, (room, plan.device_layers)
    # a budget that holds every layer keeps them all, with no room for a layer in flight (none is)
    for room in (33, 40):
        plan = plan_residency(m, cpu, dtype_size=sizes, max_memory={"cpu": resident + room * unit}, prefetch=0)
        assert plan.device_layers == [0, 1, 2, 3, 4, 5] and plan.streamed == []
    # on a GPU: the device tier, then the host tier (stored sizes: these shards' own, all the same) and the page cache
    budget = {0: resident + working + 3 * unit, "cpu": 0}
    plan = plan_residency(m, cuda, dtype_size=sizes, max_memory=budget, prefetch=0, reserve=0)
    assert plan.device_layers == [0, 1, 2] and plan.streamed == [3, 4, 5]
    budget = {**budget, 0: budget[0] + 10 * unit}
    plan = plan_residency(m, cuda, dtype_size=sizes, max_memory=budget, prefetch=0, reserve=0)
    assert kept(plan, plan.device_layers) <= 13 * unit and plan.device_layers == [0, 1, 2, 4]
    plan = plan_residency(m, cuda, dtype_size=sizes, max_memory={0: resident + 33 * unit}, prefetch=1, reserve=0)
    assert plan.device_layers == [0, 1, 2, 3, 4, 5] and plan.streamed == []


def test_planned_use_is_what_the_plan_counts_against_the_device_budget():
    """`planned_use()` (what `attaching_adapters` adds the adapters' bytes to) is what `plan_residency` fitted into
    the device's budget: within it, with no room left for another layer there, wherever the budget can hold the
    least the plan needs; over CPU and GPU plans, layers of different sizes, `prefetch`, the weight dequantized per
    module, the reserve, and resident parts moved to host RAM."""
    from conftest import shaped_shard_dir

    unit = 2**20
    m = shaped_shard_dir(6, 10 * unit, 40 * unit)
    sizes = {i: s * unit for i, s in enumerate([2, 2, 10, 10, 10, 4])}
    # (the head moved to host RAM is copied to the device for each pass: 30 MiB there while it runs, more than the
    # layers in flight)
    candidates = [("output_embeddings", 30 * unit, 30 * unit)]
    checked = 0
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        key = "cpu" if device.type == "cpu" else 0
        for prefetch, scratch, reserve, dtype_size in [
            (0, 0, 0, None),
            (1, 0, 0, sizes),
            (2, 3 * unit, 0, sizes),
            (1, 0, 5 * unit, None),
            (3, unit, 2 * unit, sizes),
        ]:
            for budget in range(0, 120 * unit, 3 * unit):
                plan = plan_residency(
                    m,
                    device,
                    dtype_size=dtype_size,
                    max_memory={key: budget, "cpu": budget} if key == 0 else {"cpu": budget},
                    prefetch=prefetch,
                    reserve=reserve,
                    scratch=scratch,
                    host_candidates=candidates,
                )
                use = plan.planned_use()
                if use > budget:  # (a budget that cannot hold the least the plan needs: nothing kept there)
                    assert plan.device_layers == [], (device, prefetch, budget, plan)
                    continue
                checked += 1
                others = [i for i in range(6) if i not in plan.device_layers]
                assert all(use + plan.layer_bytes[i] > budget for i in others), (device, prefetch, budget, plan)
    assert checked > 50
    # by hand: 40 MiB resident, three layers of 10 MiB kept in a budget of 90 MiB, two in flight
    plan = plan_residency(m, torch.device("cpu"), max_memory={"cpu": 90 * unit}, prefetch=1)
    assert len(plan.device_layers) == 3 and plan.planned_use() == (40 + 3 * 10 + 2 * 10) * unit


def test_pick_keeps_the_uniform_rule_and_fills_what_is_left():
    from hf_layerstream.engine import _pick

    assert _pick([5] * 8, list(range(8)), 20) == [0, 2, 4, 6]  # one size: the most that fit, evenly spaced
    assert _pick([5] * 8, list(range(8)), 19) == [0, 2, 5]
    assert _pick([5] * 8, list(range(8)), 0) == []
    # 4 is the most that could fit (the four of size 1); 4 evenly spaced, [0, 1, 3, 4], fit too (13)
    assert _pick([10, 1, 10, 1, 1, 1], list(range(6)), 13) == [0, 1, 3, 4]
    # 3 could fit (1 + 1 + 1); 3 evenly spaced, [0, 2, 4], do not (30), 2 do ([0, 3], 11); then the largest of the
    # others that fits in what is left (1): a layer of size 1
    assert _pick([10, 1, 10, 1, 10, 1], list(range(6)), 12) == [0, 1, 3]
    for sizes, room in [([10, 1, 10, 1, 1, 1], 13), ([3, 9, 1, 7, 2, 8, 4], 15), ([1, 2, 3], 100), ([7], 6)]:
        chosen = _pick(sizes, list(range(len(sizes))), room)
        assert sum(sizes[i] for i in chosen) <= room and chosen == sorted(set(chosen))
        left = room - sum(sizes[i] for i in chosen)
        assert all(sizes[i] > left for i in range(len(sizes)) if i not in chosen)  # nothing else would fit


def test_plan_counts_resident_parts_at_the_compute_dtype(llama):
    """A float32 checkpoint computed in bfloat16: the plan counts the resident parts (embeddings, head) at half
    their stored bytes, as it counts the layers."""
    ckpt, shards, *_ = llama
    m = ShardDirectory(shards)
    assert m.unit("resident").tensors["model.embed_tokens.weight"].dtype == torch.float32
    model = streamed_model(ckpt, shards, dtype=torch.bfloat16, max_memory={"cpu": 0})
    plan = get_streaming_state(model).plan
    assert plan.resident_bytes == m.unit("resident").logical_nbytes // 2
    assert plan.layer_bytes[0] == m.unit("layers.0").logical_nbytes // 2
    disable_layer_streaming(model)


def test_plan_cuda_tiers_without_a_gpu(llama, monkeypatch):
    """The device/host/disk split is arithmetic: with explicit budgets it needs no GPU to check. (The available
    memory, which a budget without "cpu" takes its share of, held still: two plans compared read it apart, and another
    process allocating between them made them differ.)"""
    from hf_layerstream import engine

    monkeypatch.setattr(engine, "available_host_memory", lambda: 16 * 2**30)
    _, shards, *_ = llama
    m, resident, layer = _sizes(shards)
    stored = m.unit("layers.0").size
    cuda = torch.device("cuda", 0)
    # staging buffers (pinned, one per layer read from the disk in flight) are set aside only for layers streamed: a
    # host budget holding the four layers the device does not keeps them all (it kept 3, and streamed one, as if
    # `prefetch + 1` buffers were always needed)
    budget = {0: resident + 2 * layer + 2 * layer, "cpu": 4 * stored}
    plan = plan_residency(m, cuda, max_memory=budget, prefetch=1, reserve=0)
    assert plan.device_layers == [0, 3] and plan.host_layers == [1, 2, 4, 5] and plan.streamed == []
    # a byte less: 3 in host RAM would leave one streamed, with its buffer (4 layers' bytes); 2 leave two, with two
    # buffers (prefetch 1: two in flight); so one is kept, and three stream through two buffers
    plan = plan_residency(m, cuda, max_memory={**budget, "cpu": 4 * stored - 1}, prefetch=1, reserve=0)
    assert plan.device_layers == [0, 3] and len(plan.host_layers) == 1 and len(plan.streamed) == 3
    assert set(plan.device_layers) | set(plan.host_layers) | set(plan.streamed) == set(range(6))
    assert plan.tier(plan.streamed[0]) == "disk"
    assert plan.tier(0) == "device" and plan.tier(plan.host_layers[0]) == "host"
    assert "pinned host RAM" in plan.summary()
    # a `prefetch` beyond the layers is what the loader runs, n - 1: it asked the budgets for more than runs
    for budget in ({0: 2**20}, {0: 0, "cpu": 6 * stored}, {0: resident + 3 * layer, "cpu": 2 * stored}):
        beyond = plan_residency(m, cuda, max_memory=budget, prefetch=8, reserve=0)
        assert beyond == plan_residency(m, cuda, max_memory=budget, prefetch=5, reserve=0) and beyond.prefetch == 5
    nothing = plan_residency(m, cuda, max_memory={0: 0, "cpu": 0}, prefetch=1, reserve=0)
    assert nothing.device_layers == [] and nothing.host_layers == [] and nothing.streamed == list(range(6))


# --- errors in the loader -------------------------------------------------------------------------------------------


def _copy_shards(shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


class _OnToken:
    """A streamer calling `action` once, after the `at`-th generated token."""

    def __init__(self, at: int, action):
        self.count, self.at, self.action = 0, at, action

    def put(self, value):
        self.count += 1
        if self.count == self.at + 1:
            self.action()

    def end(self):
        pass


def test_truncated_file_mid_generation_names_the_layer(llama, tmp_path):
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    path = shards / "layers" / "00003.safetensors"
    original = path.read_bytes()

    def truncate():
        with open(path, "r+b") as f:
            f.truncate(len(original) // 2)

    with pytest.raises(LayerLoadError, match=r"layer 3\b") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, streamer=_OnToken(1, truncate))
    assert "00003.safetensors" in str(info.value)
    # the file is repaired: re-enabling streaming gives the exact output again
    path.write_bytes(original)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader = get_streaming_state(model).loader
    assert all(t.name.startswith("hf_layerstream-loader") for t in _loader_threads(loader))
    disable_layer_streaming(model)
    assert not _loader_threads(loader)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_a_streamed_layers_file_deleted_mid_generation_is_named_with_the_fix(llama, tmp_path, mapped):
    """A layer file deleted (or its folder moved) while a model streams from it failed its next use with a bare
    `FileNotFoundError`, naming no way out: it is a `ShardFileError` saying what happened and the fix (the same split
    run again writes it back; then enable streaming again), which gives the exact output again."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    get_streaming_state(model).loader._map = mapped
    path = shards / "layers" / "00003.safetensors"
    with pytest.raises(LayerLoadError, match=r"layer 3\b") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, streamer=_OnToken(1, path.unlink))
    cause = info.value.__cause__
    assert isinstance(cause, ShardFileError) and cause.path == path, repr(cause)
    assert "is gone" in str(cause) and "Run the same `split_checkpoint`" in str(cause)
    with pytest.raises(LayerLoadError, match="is gone"):  # (at every use, until repaired)
        model.generate(**inputs, **GEN, pad_token_id=pad)
    split_checkpoint(ckpt, shards, progress=False)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_streamed_layers_blob_deleted_from_the_hub_cache_is_told_to_be_downloaded_again(llama, tmp_path):
    """The same for a hub repo's download in the hub cache (a layer file there is a link to a blob): its fix said to
    run the split again, which refuses to write into the hub cache; it says to download it again."""
    ckpt, shards, inputs, expected, pad = llama
    snapshot = _models.hub_snapshot(_copy_shards(shards, tmp_path), tmp_path / "cache", repo="someorg--layers")
    model = streamed_model(ckpt, snapshot, **STREAM_ALL)
    blob = os.path.realpath(snapshot / "layers" / "00003.safetensors")
    with pytest.raises(LayerLoadError, match=r"layer 3\b") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, streamer=_OnToken(1, lambda: os.unlink(blob)))
    cause = info.value.__cause__
    assert isinstance(cause, ShardFileError) and "is gone" in str(cause), repr(cause)
    cache = os.path.realpath(tmp_path / "cache")  # (not huggingface_hub's: named, where the download is to go)
    assert f"download it again (`hf download someorg/layers --cache-dir {cache} --force-download`)" in str(cause)
    assert "split_checkpoint" not in str(cause)
    disable_layer_streaming(model)


def test_a_kept_layer_that_cannot_be_loaded_names_the_layer(llama, tmp_path):
    """The default CPU plan keeps layers, loaded at their first use: a failure there is a `LayerLoadError` naming the
    decoder layer and its file, as for a streamed layer (it was the file's `ShardFileError`, which code catching
    `LayerLoadError` missed), and counts in the loader's failures."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards)
    loader = get_streaming_state(model).loader
    assert loader.plan.tier(1) == "device" and 1 not in loader._device_cache
    (shards / "layers" / "00001.safetensors").unlink()
    with pytest.raises(LayerLoadError, match=r"decoder layer 1 from .*00001\.safetensors failed"):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert loader.failures == 1 and loader.in_use() == []
    disable_layer_streaming(model)


def test_a_kept_layer_swaps_in_the_same_parameters_at_every_pass(llama):
    """A layer kept on the device holds the same tensors at every pass: its hook makes their `nn.Parameter`s once (one
    set with gradients off, one with them on, which never require grad) and swaps those in at each pass; a streamed
    layer's are made for each pass. The output stays exact, and disabling streaming lets the kept tensors go."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": "1GiB"})  # (the default keeps every layer here too)
    loader = get_streaming_state(model).loader
    assert all(loader.plan.tier(i) == "device" for i in range(6))
    layer = model.model.layers[2]
    seen = []
    # (inside the layer's forward pass: what its hook swapped in)
    layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append((m.q_proj.weight, layer.input_layernorm.weight)))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    with torch.no_grad():
        model(**inputs)
    weight = seen[0][0]
    assert len(seen) > 2 and all(w is weight and n is seen[0][1] for w, n in seen)
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad  # (as the model's own, see `_wants_grad`)
    assert weight.data_ptr() == loader.kept(2)["self_attn.q_proj.weight"].data_ptr()
    seen.clear()
    logits = model(**inputs).logits  # gradients on: weights that require none, made once too
    model(**inputs)
    assert seen[0][0] is not weight and seen[0][0] is seen[1][0] and not seen[0][0].requires_grad
    assert not logits.requires_grad
    kept = weakref.ref(loader.kept(2)["self_attn.q_proj.weight"])
    del seen, weight
    disable_layer_streaming(model)
    gc.collect()
    assert kept() is None

    # every layer streamed: a layer's Parameters are made for each pass (its tensors are the loader's for that pass)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    layer = model.model.layers[2]
    seen = []
    layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append(m.q_proj.weight))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert len(seen) > 2 and len({id(w) for w in seen}) == len(seen)
    assert get_streaming_state(model).hooks[2]._kept_values is None
    disable_layer_streaming(model)


def test_a_kept_layer_follows_requires_grad_changed_after_its_parameters_were_made(llama):
    """The Parameters a kept layer's hook makes once require grad (without gradients) as their placeholders did then;
    the caller may change that later (`model.requires_grad_(False)`, as for a frozen loaded model): the next pass
    swaps in weights that follow it, as a streamed layer's do. Some kernels choose by it (see `hooks._wants_grad`):
    reused, a Mamba model gave other bits than the loaded model frozen alike."""
    ckpt, shards, *_ = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": "1GiB"})
    assert get_streaming_state(model).loader.plan.tier(1) == "device"
    q_proj, norm = model.model.layers[1].self_attn.q_proj, model.model.layers[1].input_layernorm
    seen = []
    for m in (norm, q_proj):
        m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
    ids = torch.tensor([[1, 5, 7, 9]])

    def flags() -> list[bool]:
        seen.clear()
        with torch.no_grad():
            model(ids)
        return list(seen)

    assert flags() == [True, True] and flags() == [True, True]
    model.requires_grad_(False)
    assert flags() == [False, False]
    q_proj.requires_grad_(True)
    assert flags() == [False, True]
    model.requires_grad_(True)
    assert flags() == [True, True]
    disable_layer_streaming(model)


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "on-demand"])
def test_a_failed_load_frees_what_it_had_made(llama, read_ahead, monkeypatch):
    """A load that fails part way (a GPU out of memory after some weights were copied, a damaged file) frees what it
    had made at once, not when its error is let go: the error's traceback would hold the loader's frames and their
    tensors (on a GPU, device memory). Read ahead: the first attempt's are freed before the retry too, and both stay
    freed while the caller holds the `LayerLoadError`. Loaded on demand (`prefetch=0`), the same."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1 if read_ahead else 0)
    loader = get_streaming_state(model).loader
    loader._map = False  # every layer read into a buffer (the CUDA path): its tensors are made by the load
    made: list[weakref.ref] = []
    alive_at_retry = []
    real, real_submit = loader._relative, loader._submit

    def failing(index, tensors):  # the last step of a load, with every tensor made
        if index == 2:
            made.extend(weakref.ref(t) for t in tensors.values())
            raise RuntimeError("CUDA out of memory. (simulated)")
        return real(index, tensors)

    def submit(index):  # a load on demand, or (once an attempt failed) the retry of a layer read ahead
        if made:
            gc.collect()
            alive_at_retry.append(sum(r() is not None for r in made))
        return real_submit(index)

    monkeypatch.setattr(loader, "_relative", failing)
    monkeypatch.setattr(loader, "_submit", submit)
    with pytest.raises(LayerLoadError, match=r"decoder layer 2 .*CUDA out of memory") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad)
    gc.collect()
    assert made and [r() for r in made] == [None] * len(made)
    assert alive_at_retry == ([0] if read_ahead else [])
    assert "_relative" in "".join(traceback.format_exception(info.value))  # (the traceback keeps its lines)
    monkeypatch.undo()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def _assert_every_buffer_accounted_for(loader) -> None:
    """Every read buffer the loader ever allocated is idle in its pool or holds a layer read ahead or in use (failed
    reads gave theirs back: pinned ones, on CUDA, would otherwise stay pinned until disable)."""
    loader.wait_idle()
    ahead = [f.result() for f in loader._pending.values() if f.exception() is None]
    held = sum(ready.buffer is not None for ready in [*ahead, *loader._in_use.values()])
    assert loader._pool.allocated == len(loader._pool._free) + held


def test_a_read_buffer_kept_alive_by_a_view_leaves_the_pool(llama):
    """A layer read into a pool buffer (CPU: its tensors are views of it) whose weight a caller keeps past the layer's
    use (a hook, an autograd graph, a traceback after Ctrl-C): the buffer is not reused (the view keeps the bytes it
    read) and no longer counted as the pool's, which counted it for good before."""
    ckpt, shards, inputs, expected, pad = llama
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = False, False
    kept = []
    handle = model.model.layers[2].mlp.register_forward_hook(lambda m, a, o: kept.append(m.down_proj.weight))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    handle.remove()
    assert kept and all(torch.equal(w, ref.model.layers[2].mlp.down_proj.weight) for w in kept)
    _assert_every_buffer_accounted_for(loader)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    _assert_every_buffer_accounted_for(loader)
    disable_layer_streaming(model)


def test_read_buffers_freed_for_mapped_layers_are_not_counted(llama):
    """Layers read into pool buffers, then mapped (the page cache holds the files now, or the plan changed its way):
    each mapped layer frees one idle buffer, and the pool counts it as gone (it counted it for good before, so its
    bound of `prefetch + 1` buffers was checked against buffers that no longer existed)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    loader._map = False
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    _assert_every_buffer_accounted_for(loader)
    read = loader._pool.allocated
    assert read > 0
    loader._map = True
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    _assert_every_buffer_accounted_for(loader)
    assert loader._pool.allocated < read
    disable_layer_streaming(model)


def test_a_failed_read_is_freed_without_the_garbage_collector(llama, monkeypatch):
    """A layer read ahead whose read fails once (an I/O error) and is read again at its use: the failed load, its
    error and what its traceback's frames hold are freed as the call drops them, not left in a reference cycle for
    the garbage collector (a process that turns it off, as some servers do, kept a layer per failed read)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = False, False
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    real, failed = loader._read_file, []

    def flaky(header, buf, index):
        if index == 3 and not failed:
            failed.append(1)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(header, buf, index)

    monkeypatch.setattr(loader, "_read_file", flaky)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected) and failed
        loader.wait_idle()
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kinds & {"_Load", "_Ready", "OSError", "_WorkItem"}, kinds
    disable_layer_streaming(model)


def test_transient_read_error_then_works_again(llama, monkeypatch):
    """A failing read (e.g. an I/O error) raises in the caller naming the layer; the next call reads it again."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map = False  # every read goes through `_read_file` (the CUDA path), not a map
    real = loader._read_file
    failures = {"left": 2}  # the prefetched read and its retry both fail

    def flaky(header, buf, index):
        if header.path.name == "00004.safetensors" and failures["left"]:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(header, buf, index)

    monkeypatch.setattr(loader, "_read_file", flaky)
    with pytest.raises(LayerLoadError, match=r"decoder layer 4 .*Input/output error"):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    _assert_every_buffer_accounted_for(loader)
    disable_layer_streaming(model)


def test_prefetched_failure_is_retried(llama, monkeypatch):
    """A read-ahead that failed (file being repaired, say) is retried once when the layer is needed."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map = False  # every read goes through `_read_file` (the CUDA path), not a map
    real = loader._read_file
    failures = {"left": 1}

    def flaky(header, buf, index):
        if header.path.name == "00002.safetensors" and failures["left"]:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(header, buf, index)

    monkeypatch.setattr(loader, "_read_file", flaky)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert failures["left"] == 0
    disable_layer_streaming(model)


def test_the_fix_a_changed_layer_file_names_restores_the_output(llama, tmp_path):
    """A layer file changed within (outside its sampled ends) under a running model fails its next use, and the error
    said to re-run the same split "to repair the directory": that re-run checks sizes, headers and sample digests only,
    found nothing to do, and a fresh enable computed with the changed weights, silently. The fix it names now (delete
    the file, re-run the split) gives the loaded model's output again."""
    from hf_layerstream import split_checkpoint

    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    path = shards / "layers" / "00002.safetensors"
    data = bytearray(path.read_bytes())
    assert len(data) > 2**17 + 4096
    data[2**16 : -(2**16)] = bytes(len(data) - 2**17)
    path.write_bytes(bytes(data))  # (in place: the same inode, another mtime)
    with pytest.raises(LayerLoadError) as caught:
        model.generate(**inputs, **GEN, pad_token_id=pad)
    message = str(caught.value.__cause__)
    assert "delete it and re-run the same `split_checkpoint`" in message
    disable_layer_streaming(model)
    path.unlink()
    split_checkpoint(ckpt, shards, progress=False)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_kept_map_is_not_served_after_verify_reads_a_replaced_file_anew(llama, tmp_path):
    """A layer file replaced under a running model (its middle bytes, outside the sampled ends) fails its next use.
    `ShardDirectory.verify()` then reads the directory's headers again, and the loader's check accepted the new file,
    while its kept map still held the old one: the old bytes were served, with no error. The map is made anew: the
    output is what a fresh enable on the directory as it is gives."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    state = get_streaming_state(model)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert 3 in state.loader._maps
    path = shards / "layers" / "00003.safetensors"
    data = bytearray(path.read_bytes())
    assert len(data) > 2**17 + 4096  # (a middle outside the two sampled 64 KiB ends)
    data[2**16 : -(2**16)] = bytes(len(data) - 2**17)  # zeros: other weights, the same header and sampled ends
    path.with_name("new.tmp").write_bytes(bytes(data))
    os.replace(path.with_name("new.tmp"), path)
    with pytest.raises(LayerLoadError, match="changed on disk"):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert state.shard_dir.verify(checksums=False) == []
    with torch.no_grad():
        now = model(**inputs).logits
    disable_layer_streaming(model)
    fresh = streamed_model(ckpt, shards, **STREAM_ALL)
    with torch.no_grad():
        assert torch.equal(now, fresh(**inputs).logits)
        assert not torch.equal(now, _models.load_reference(ckpt)(**inputs).logits)  # (the new bytes, not the old)
    disable_layer_streaming(fresh)


def _rewrite_in_place(path) -> None:
    """Zeros over the middle of `path`, written into the file itself (as `cp` over it writes): the same inode and
    size, other weights."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(bytes(size // 2))


def _replace_by(data: bytes):
    def replace(path):  # (as a split writes a file: anew, renamed into place)
        path.with_name("x").write_bytes(data if data else path.read_bytes())
        os.replace(path.with_name("x"), path)

    return replace


def test_a_changed_file_is_named_by_what_changed(llama, tmp_path):
    """The error said "size 149888 -> 149888 bytes, or replaced or rewritten in place" for a file of the same size:
    it names the change it found now. Its fix told to delete the file and re-run the split for a file another had
    replaced too: a split run again (`overwrite=True`), or the path's symlink moved to another split, where deleting
    it damaged a sound split; for those it says to enable streaming again."""
    _, shards, *_ = llama
    for i, (change, named, replaced) in enumerate(
        (
            (_rewrite_in_place, "(rewritten in place: modified since)", False),
            (_replace_by(b""), "(replaced by another file)", True),
            (lambda p: os.truncate(p, p.stat().st_size // 2), "(size {size} -> {half} bytes)", False),
            (_replace_by(bytes(100)), "(size {size} -> 100 bytes, another file)", True),
        )
    ):
        copy = _copy_shards(shards, tmp_path / str(i))
        path = copy / "layers" / "00001.safetensors"
        size = path.stat().st_size
        header = ShardDirectory(copy).header(layer_unit(1))
        change(path)
        with pytest.raises(ShardFileError) as caught:
            header.check_stat(os.stat(path))
        named = named.format(size=size, half=size // 2)
        assert f"changed on disk since it was opened {named}" in str(caught.value)
        assert ("delete it and re-run" in str(caught.value)) is not replaced, named
        assert ("split again (`overwrite=True`)" in str(caught.value)) is replaced, named


@pytest.mark.parametrize("when", ["at enable", "by the last call"])
def test_a_layer_read_ahead_is_checked_at_its_use(llama, tmp_path, when):
    """A layer read ahead (at enable, or for the next call as a call ends) was checked when it was read only: its
    file rewritten in place before its use was computed with once, silently (a map shows the page cache's pages:
    logits 0.26 off), and refused from the call after. It is checked at its use now, as a layer mapped then is."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    options = {"max_memory": {"cpu": 0}}
    if when == "by the last call":
        options.update(prefetch=2, keep_in_page_cache=False)
    model = streamed_model(ckpt, shards, **options)
    loader = get_streaming_state(model).loader
    if when == "by the last call":
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    assert 1 in loader._pending  # (read ahead, waiting for its use)
    _rewrite_in_place(shards / "layers" / "00001.safetensors")
    with pytest.raises(LayerLoadError, match=r"decoder layer 1 .*changed on disk"), torch.no_grad():
        model(**inputs)
    with pytest.raises(LayerLoadError, match=r"decoder layer 1 .*changed on disk"), torch.no_grad():
        model(**inputs)
    disable_layer_streaming(model)


def test_a_file_mapped_once_and_kept_rewritten_in_place_fails_the_next_pass(llama, tmp_path):
    """On CPU a layer the plan keeps, and the resident parts, are maps of their files made once: a file rewritten in
    place between two calls (`cp` of another split's file over it) changed the weights under the model, silently
    (logits 0.48 off), and after the file was put back too, while a streamed layer's file fails its next use. Each
    pass now checks them (one `stat` each); a file replaced by a rename leaves the map the old file: still exact."""
    ckpt, shards, inputs, expected, pad = llama
    for name, plan in (("layers/00002.safetensors", {}), ("resident.safetensors", STREAM_ALL)):
        copy = _copy_shards(shards, tmp_path / name.replace("/", "_"))
        model = streamed_model(ckpt, copy, **plan)
        state = get_streaming_state(model)
        assert (2 in state.plan.device_layers) is (not plan)  # (the default plan keeps every layer)
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
        path = copy / name
        data = path.read_bytes()
        path.with_name("new.tmp").write_bytes(bytes(len(data)))  # zeros, by a rename: another file
        os.replace(path.with_name("new.tmp"), path)
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected), name
        disable_layer_streaming(model)
        path.write_bytes(data)
        model = streamed_model(ckpt, copy, **plan)
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
        _rewrite_in_place(path)
        with pytest.raises(ShardFileError, match="changed on disk") as caught:
            model.generate(**inputs, **GEN, pad_token_id=pad)
        assert caught.value.path == path and "disable_layer_streaming" in str(caught.value), name
        disable_layer_streaming(model)


_TRUNCATED_THEN_REPLACED = """
import os, sys
import torch
sys.path.insert(0, sys.argv[4])
import _models
from conftest import streamed_model
from hf_layerstream import ShardFileError, disable_layer_streaming, split_checkpoint

ckpt, shards, name = sys.argv[1], sys.argv[2], sys.argv[3]
plan = {"max_memory": {"cpu": 0}} if name == "resident.safetensors" else {}
ids = torch.tensor([[1, 5, 9, 17, 33, 40, 7, 3]])
with torch.no_grad():
    expected = _models.load_reference(ckpt)(ids).logits
path = os.path.join(shards, name)
for way in ("a pass between", "no pass between"):
    model = streamed_model(ckpt, shards, **plan)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    os.truncate(path, os.path.getsize(path) // 2)
    if way == "a pass between":  # (found at once: the file the map maps is the path's)
        try:
            model(ids)
            raise AssertionError("a truncated kept file was not refused")
        except ShardFileError as e:
            assert "changed on disk" in str(e), e
    split_checkpoint(ckpt, shards, progress=False)  # the repair: a new file, renamed over the truncated one
    for _ in range(2):  # (its map still maps the truncated file: a read of its pages past the end is a SIGBUS)
        try:
            with torch.no_grad():
                model(ids)
            raise AssertionError(f"{way}: a kept map of a truncated file was read")
        except ShardFileError as e:
            assert "changed on disk" in str(e) or "truncated" in str(e), e
    disable_layer_streaming(model)
    model = streamed_model(ckpt, shards, **plan)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    disable_layer_streaming(model)
print("ok")
"""


@pytest.mark.parametrize("name", ["layers/00002.safetensors", "resident.safetensors"])
def test_a_kept_file_truncated_then_repaired_by_a_new_split_fails_its_passes_not_the_process(llama, tmp_path, name):
    """On CPU a kept layer's file (and the resident file, in every plan) is mapped once. Truncated, then repaired as
    the error says (the same split again: a new file renamed over it), the next pass found the path naming another
    file and left the map unchecked: it still mapped the truncated file, and its read killed the process with SIGBUS.
    The file the map maps is checked through the map (its size) now: every pass raises until streaming is enabled again, also
    where no pass ran between the truncation and the repair. In a child process, as a regression kills it."""
    import subprocess
    import sys

    ckpt, shards, *_ = llama
    copy = _copy_shards(shards, tmp_path)
    tests = str(Path(__file__).parent)
    # as a user without capabilities runs it, where root runs the tests (a check through /proc/self/map_files, which
    # needs CAP_SYS_ADMIN, passed here as root, and a user's process still died)
    plain = (
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 and shutil.which("setpriv") else []
    )
    out = subprocess.run(
        [*plain, sys.executable, "-c", _TRUNCATED_THEN_REPLACED, str(ckpt), str(copy), name, tests],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-3000:])


def test_running_out_of_file_descriptors_is_named_as_the_limit_not_damage(llama, monkeypatch):
    """On CPU each layer file's map is kept, holding a descriptor: a model of more layers than `ulimit -n` allows ran
    out at some layer with "cannot be read: Too many open files. Re-create the shard directory" (the file is sound),
    or, every layer streamed, a bare `OSError`. The error names the limit and its fix now."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    state = get_streaming_state(model)
    state.loader.wait_idle()
    victim = str(state.loader.shards.files[layer_unit(4)])
    state.loader._maps.pop(4, None)  # (its map made anew at its next use: opened then)
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path) == victim:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(LayerLoadError, match=r"decoder layer 4 .*ulimit -n") as caught:
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert "Re-create the shard directory" not in str(caught.value)
    monkeypatch.undo()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)  # (the limit raised: as before)
    disable_layer_streaming(model)


def test_a_file_replaced_between_the_check_and_the_direct_read_is_refused(llama, tmp_path):
    """A cold read with `O_DIRECT` opens the file a second time: a file replaced between the check on the first
    descriptor and that open was read with the old header, silently, for one use. The second descriptor is checked
    too."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, keep_in_page_cache=False, **STREAM_ALL)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    loader._map = False  # reads, as on CUDA
    if not loader._direct:
        pytest.skip("no O_DIRECT here")
    real = loader._read_direct
    path = shards / "layers" / "00002.safetensors"

    def replaced_first(header, view):
        if header.path == path:
            data = path.read_bytes()
            path.with_name("new.tmp").write_bytes(data)
            os.replace(path.with_name("new.tmp"), path)  # the same bytes, another file
        return real(header, view)

    loader._read_direct = replaced_first
    drop_or_skip([path])  # (read from the disk: with O_DIRECT)
    with pytest.raises(LayerLoadError, match="changed on disk"):
        with torch.no_grad():
            model(**inputs)
    disable_layer_streaming(model)


# --- shutdown -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [STREAM_ALL, {}], ids=["streamed", "resident"])
def test_disable_stops_thread_and_frees_memory(llama, options):
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **options)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    state = get_streaming_state(model)
    loader = state.loader
    refs = [weakref.ref(model.model.embed_tokens.weight)]
    refs += [weakref.ref(t) for layer in loader._device_cache.values() for t in layer.tensors.values()]
    refs += [weakref.ref(buf) for buf, _ in loader._pool._free]
    refs += [weakref.ref(f) for f in loader._pending.values()]
    refs += [weakref.ref(x) for kept in loader._maps.values() for x in (kept.mm, *kept.views.values())]
    assert len(refs) > 1
    if options:
        assert loader._maps, "streamed layers are mapped on CPU"
    threads = list(loader._executor._threads)
    if options:
        assert threads, "streaming all layers must have started the loader thread"
        assert all(t.name.startswith("hf_layerstream-loader") for t in threads)
    del state
    disable_layer_streaming(model)
    loader = None
    gc.collect()
    assert not [t for t in threads if t.is_alive()]
    alive = [r for r in refs if r() is not None]
    assert not alive, f"{len(alive)} tensors/buffers of the loader are still alive after disable"
    assert model.model.embed_tokens.weight.is_meta
    with pytest.raises(ValueError, match="not enabled"):
        disable_layer_streaming(model)


def test_a_disable_interrupted_while_it_waits_for_the_threads_is_finished_by_the_next(llama, monkeypatch):
    """Ctrl-C while `disable_layer_streaming` waits for the loader's threads: the model is still streaming (enable
    refuses), and the next disable finishes the loader's close (it returned at once, leaving the maps, their files
    and the map threads until the garbage collector came)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader = get_streaming_state(model).loader
    assert loader._maps
    threads = _loader_threads(loader)
    shutdown = loader._executor.shutdown

    def interrupted(*args, **kwargs):
        shutdown(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loader._executor, "shutdown", interrupted)
    with pytest.raises(KeyboardInterrupt):
        disable_layer_streaming(model)
    monkeypatch.undo()
    assert get_streaming_state(model) is not None and loader._maps
    disable_layer_streaming(model)
    assert not loader._maps and not [t for t in threads if t.is_alive()]
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("where", ["_load_generation_config", "_refuse", "start", "summary"])
def test_an_enable_interrupted_at_its_end_leaves_the_model_as_it_was(llama, monkeypatch, where, caplog):
    """Ctrl-C late in `enable_layer_streaming` (reading the shard directory's `generation_config.json`; wrapping the
    model's methods; starting the loader): the hooks were in but no state was attached, so `disable` said streaming
    was not enabled and a second `enable` named a `device_map` the caller never gave, for good. Now an interrupted
    enable undoes itself: the model is as before, and enables again."""
    from hf_layerstream import engine, stream

    ckpt, shards, inputs, expected, pad = llama
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    dtype_before = model.config.dtype
    before = set(vars(model))
    threads = set(_loader_threads())  # (other tests' models may be alive in this process)
    owner, name = (engine.LayerLoader, where) if where == "start" else (stream, where)
    if where == "summary":  # (the plan logged as the last step: it was outside the undo, leaving the model enabled)
        owner = engine.ResidencyPlan
        caplog.set_level(logging.INFO, logger="hf_layerstream")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        enable_layer_streaming(model, shards, device="cpu", dtype=torch.bfloat16, **STREAM_ALL)
    monkeypatch.undo()
    assert get_streaming_state(model) is None and not set(_loader_threads()) - threads
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert set(vars(model)) == before and "forward" not in vars(model.model)
    assert not hasattr(model, "hf_device_map") and model.config.dtype == dtype_before
    assert all(p.is_meta for p in model.parameters())
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_an_enable_failing_out_of_memory_undoes_itself_when_its_undo_fails_too(llama, monkeypatch):
    """At a tight address-space limit (`ulimit -v`) an enable of a 200-layer model raised `MemoryError`, and its undo
    raised `MemoryError` again part way: the hooks of 176 layers were left on the model, and the next enable said it
    "already has an accelerate hook (the model was dispatched with a `device_map`)". Each undo step runs now, the
    hooks' removal a second time where the first failed."""
    from hf_layerstream import stream
    from hf_layerstream.hooks import LayerStreamingHook

    ckpt, shards, inputs, expected, pad = llama
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    real_detach, failed = stream._detach, []

    def detach(module, kinds):
        if not failed and isinstance(getattr(module, "_hf_hook", None), LayerStreamingHook):
            failed.append(module)
            raise MemoryError
        return real_detach(module, kinds)

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(stream, "_detach", detach)
    monkeypatch.setattr(LayerStreamingHook, "hold_between_passes", out_of_memory)
    with pytest.raises(MemoryError):
        enable_layer_streaming(model, shards, device="cpu")
    monkeypatch.undo()
    assert failed and not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert get_streaming_state(model) is None and all(p.is_meta for p in model.parameters())
    enable_layer_streaming(model, shards, device="cpu")
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    # where hooks are left all the same (no undo could run), the next enable names them as such, not a device_map
    other = build_meta_model(AutoConfig.from_pretrained(ckpt))
    monkeypatch.setattr(stream, "_undo_each", lambda *steps: None)
    monkeypatch.setattr(LayerStreamingHook, "hold_between_passes", out_of_memory)
    with pytest.raises(MemoryError):
        enable_layer_streaming(other, shards, device="cpu")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"holds a hook of an `enable_layer_streaming` that failed part way"):
        enable_layer_streaming(other, shards, device="cpu")


def test_a_loader_thread_that_cannot_start_is_named_by_the_limits(llama, monkeypatch):
    """At a tight address-space limit (`ulimit -v`) a loader thread could not start, and enable raised a bare
    `RuntimeError: can't start new thread`, where the README says such a limit is named: it names the limits now (the
    enable undoes itself, and works once the limit is raised)."""
    ckpt, shards, inputs, expected, pad = llama
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("hf_layerstream-loader"):
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match=r"cannot start a loader thread \(can't start new thread\).*`ulimit -v`"):
        enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    monkeypatch.undo()
    assert get_streaming_state(model) is None and not any(hasattr(m, "_hf_hook") for m in model.modules())
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_base_exception_in_the_loader_thread_fails_one_pass_not_every_later_one(llama, monkeypatch):
    """A `BaseException` that is no `Exception` (a `SystemExit` from code the loader thread ran) for one layer: the pass
    re-raised it, and the failed read went back among the reads ahead as if Ctrl-C had interrupted the wait, so every
    later pass re-raised it too, until streaming was enabled again. The next pass reads the layer again now."""
    from hf_layerstream.engine import LayerLoader

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    real, fired = LayerLoader._load_streamed, []

    def once(self, index, *args, **kwargs):
        if index == 2 and not fired:
            fired.append(index)
            raise SystemExit("in the loader thread")
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(LayerLoader, "_load_streamed", once)
    with pytest.raises(SystemExit, match="in the loader thread"), torch.no_grad():
        model(**inputs)
    assert fired == [2]
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_call_beginning_while_disable_takes_the_model_apart_waits_and_is_named(llama, monkeypatch):
    """`disable_layer_streaming` took the forward wrappers off first, then took the rest apart holding the lock: a call
    beginning in between found no wrapper, did not wait, and ran on a model half taken apart (meta-device logits, no
    error). The wrappers go last now: such a call waits for the lock and raises `DISABLED_DURING_CALL`."""
    import hf_layerstream.stream as stream
    from hf_layerstream.hooks import DISABLED_DURING_CALL

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    tearing, calling, result = threading.Event(), threading.Event(), {}
    real_restore = stream._restore

    def restore(*args, **kwargs):  # (the teardown, paused half way while the other thread calls the model)
        real_restore(*args, **kwargs)
        tearing.set()
        assert calling.wait(30)
        time.sleep(0.3)

    def caller():
        assert tearing.wait(30)
        calling.set()
        try:
            with torch.no_grad():
                result["out"] = model(inputs["input_ids"])
        except Exception as e:  # noqa: BLE001 - the test reads it
            result["error"] = e

    monkeypatch.setattr(stream, "_restore", restore)
    worker = threading.Thread(target=caller)
    worker.start()
    disable_layer_streaming(model)
    worker.join(60)
    assert isinstance(result.get("error"), RuntimeError), result
    assert str(result["error"]) == DISABLED_DURING_CALL
    assert get_streaming_state(model) is None and "forward" not in vars(model)


def test_a_disable_interrupted_inside_accelerate_is_finished_and_streaming_works_again(llama, monkeypatch):
    """Ctrl-C inside accelerate's `remove_hook_from_module` (it deletes `_hf_hook`, then puts the forward back) left a
    layer with accelerate's wrapper as its forward and no hook: a second disable skipped it, and the next enable took
    the wrapper for the layer's own forward, which then called itself at every pass (`RecursionError`). The second
    disable finishes it now, and an enable repairs a layer left so; the output is the loaded model's."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    import hf_layerstream.stream as stream

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    layer = get_streaming_state(model).stack.layers[0]
    real = stream.remove_hook_from_module

    def interrupted(module, *args, **kwargs):
        module._hf_hook.detach_hook(module)  # (accelerate's first steps, then the signal)
        del module._hf_hook
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "remove_hook_from_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        disable_layer_streaming(model)
    monkeypatch.setattr(stream, "remove_hook_from_module", real)
    assert "_hf_hook" not in vars(layer) and "_old_forward" in vars(layer)
    disable_layer_streaming(model)
    assert get_streaming_state(model) is None
    assert not {"_hf_hook", "_old_forward"} & set(vars(layer)) and not hasattr(layer.forward, "func")
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    # a layer left so by a disable interrupted for good (before our state could finish it): enable repairs it
    add_hook_to_module(layer, ModelHook())
    del layer._hf_hook
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    assert not {"_hf_hook", "_old_forward"} & set(vars(layer))


def test_a_disable_interrupted_late_is_finished_by_the_next(llama):
    """A disable interrupted late (Ctrl-C while it puts the configs' dtypes back) had removed the streaming state
    before the forward wrappers it now removes last: a second disable said streaming was not enabled, and the
    wrappers stayed. The state goes last: the second disable finishes, and streaming works again."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    state = get_streaming_state(model)

    class Interrupting:
        @property
        def dtype(self):
            return None

        @dtype.setter
        def dtype(self, value):
            raise KeyboardInterrupt

    state.config_dtypes.append((Interrupting(), None))
    with pytest.raises(KeyboardInterrupt):
        disable_layer_streaming(model)
    state.config_dtypes.pop()
    assert get_streaming_state(model) is state
    disable_layer_streaming(model)
    assert get_streaming_state(model) is None and "forward" not in vars(model)
    assert "forward" not in vars(state.runner)
    enable_layer_streaming(model, shards, device="cpu", **STREAM_ALL)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_disable_from_a_callback_of_generate_is_named(llama):
    """`disable_layer_streaming` called by the generating thread itself, from a logits processor: the next pass
    fails with the same named error, which does not claim another thread ran it."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from hf_layerstream.hooks import DISABLED_DURING_CALL

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)

    class DisableHere(LogitsProcessor):
        def __call__(self, input_ids, scores):
            disable_layer_streaming(model)
            return scores

    with pytest.raises(RuntimeError, match="in a callback of this one") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, logits_processor=LogitsProcessorList([DisableHere()]))
    assert str(info.value) == DISABLED_DURING_CALL
    assert get_streaming_state(model) is None


@pytest.mark.parametrize("options", [STREAM_ALL, {}], ids=["streamed", "kept"])
def test_disable_from_a_layers_hook_during_a_plain_call_is_named(llama, options):
    """`disable_layer_streaming` from a decoder layer's forward hook during a plain `model(...)` call: the rest of the
    pass met the model's own meta weights and raised torch's "Tensor on device cpu is not on the expected device
    meta!" (or accelerate's missing `_hf_hook`), where `generate` names the cause. The plain call names it too; the
    model enables again and is exact."""
    from hf_layerstream.hooks import DISABLED_DURING_CALL

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **options)
    handle = model.model.layers[2].register_forward_hook(lambda *_: disable_layer_streaming(model))
    with pytest.raises(RuntimeError) as info, torch.no_grad():
        model(**inputs)
    handle.remove()
    assert str(info.value) == DISABLED_DURING_CALL and get_streaming_state(model) is None
    enable_layer_streaming(model, shards, device="cpu", **options)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_disable_in_another_thread_during_generate_is_named(llama):
    """`disable_layer_streaming` run by another thread between two passes of a `generate`: the call's next pass finds
    the layers on the meta device, and the error says what happened (it was torch's meta-device error)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from hf_layerstream.hooks import DISABLED_DURING_CALL

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)

    class DisableElsewhere(LogitsProcessor):
        def __call__(self, input_ids, scores):
            worker = threading.Thread(target=disable_layer_streaming, args=(model,))
            worker.start()
            worker.join(60)
            return scores

    with pytest.raises(RuntimeError, match="ran during this call") as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, logits_processor=LogitsProcessorList([DisableElsewhere()]))
    assert str(info.value) == DISABLED_DURING_CALL and info.value.__cause__ is not None
    assert get_streaming_state(model) is None and "generate" not in vars(model)


def test_a_pass_waiting_for_the_lock_while_streaming_is_disabled_is_named(llama):
    """A forward pass that waited for the pass lock while another thread disabled streaming fails saying so (it ran
    on the layers put back on the meta device, and returned meta logits without an error)."""
    from hf_layerstream.hooks import DISABLED_DURING_CALL

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    guard = get_streaming_state(model).guard
    out, entered = {}, threading.Event()

    def forward():
        entered.set()
        try:
            with torch.no_grad():
                model(**inputs)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    with guard.lock:  # (a pass running elsewhere)
        caller = threading.Thread(target=forward)
        caller.start()
        assert entered.wait(10)
        caller.join(0.5)  # it waits for the lock
        assert caller.is_alive()
        disable_layer_streaming(model)
    caller.join(60)
    assert isinstance(out.get("error"), RuntimeError) and str(out["error"]) == DISABLED_DURING_CALL


def test_disable_leaves_the_users_attributes_set_over_ours(llama):
    """Attributes the user set on the model while it streamed, over our wrappers (`generate` with `profile=True`, the
    move methods), stay after `disable_layer_streaming` (they were deleted); ours go."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, profile=True, **STREAM_ALL)
    assert "generate" in vars(model) and "to" in vars(model)

    def mine(*args, **kwargs):
        return "mine"

    model.generate = mine
    model.to = mine
    disable_layer_streaming(model)
    assert vars(model)["generate"] is mine and vars(model)["to"] is mine
    assert "half" not in vars(model) and "cuda" not in vars(model)


@pytest.mark.parametrize("in_place", [False, True], ids=["read_ahead", "in_place"])
def test_a_model_deleted_without_disable_leaves_no_thread_or_memory(llama, in_place):
    """A user who drops a streamed model (`del model`, a notebook cell re-run) without `disable_layer_streaming`:
    the loader goes with it, its threads (loader, map threads) end and its maps and buffers are freed, layers read
    ahead for the next pass included."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=3)
    loader = get_streaming_state(model).loader
    loader._in_place = in_place
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    threads = list(loader._executor._threads) + [t for m in loader._mappers for t in m._threads]
    assert len(threads) >= 2, "the loader thread and a map thread ran"
    refs = [weakref.ref(loader)]
    refs += [weakref.ref(x) for kept in loader._maps.values() for x in (kept.mm, *kept.views.values())]
    refs += [weakref.ref(f) for f in loader._pending.values()]
    assert bool(loader._pending) != in_place, "the next pass's first layers are read ahead (unless mapped in place)"
    del model, loader
    gc.collect()
    for t in threads:
        t.join(10)
    assert not [t.name for t in threads if t.is_alive()]
    assert not [r for r in refs if r() is not None]


def _files_open_under(folder: Path) -> tuple[list[str], list[str]]:
    """(the maps, the file descriptors) this process holds of files under `folder`."""
    with open("/proc/self/maps") as f:
        maps = [line.split()[-1] for line in f if str(folder) in line]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (closed meanwhile: the one `listdir` read with)
            continue
        if target.startswith(str(folder)):
            fds.append(target)
    return maps, fds


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
@pytest.mark.parametrize("where", ["layer", "streamer"])
@pytest.mark.parametrize("options", [STREAM_ALL, {}], ids=["streamed", "resident"])
def test_disable_after_a_call_that_raised_frees_the_files_while_its_error_is_kept(llama, tmp_path, where, options):
    """A `generate` call that raised (an error in a hook on a layer, in a streamer; Ctrl-C) whose error is kept: by
    the caller (`except ... as e`), by Jupyter or IPython (`sys.last_value`, until the next error), by a logger. Its
    traceback holds the frames of the call, ours among them; `disable_layer_streaming` then left the resident file
    mapped and open (the output head's weight, a view of its map, held through a frame's local) until the error was
    let go: the embeddings and head of a large model, and their pages, for as long as the notebook ran. Disable lets
    go of every file."""
    ckpt, _, inputs, expected, pad = llama
    shards = tmp_path / "shards"
    shutil.copytree(llama[1], shards)  # (this test's own files: another test's model may map the fixture's)
    model = streamed_model(ckpt, shards, **options)
    state = get_streaming_state(model)

    class FailedError(Exception):
        pass

    def fail(*args):
        raise FailedError

    class Streamer:
        put, end = fail, lambda self: None

    handle = state.stack.layers[2].mlp.register_forward_pre_hook(fail) if where == "layer" else None
    kwargs = {"streamer": Streamer()} if where == "streamer" else {}
    with pytest.raises(FailedError) as info:
        model.generate(**inputs, **GEN, pad_token_id=pad, **kwargs)
    if handle is not None:
        handle.remove()
    kept = info.value  # (the error, with its traceback)
    del state, info
    assert _files_open_under(shards)[0], "the model maps its files"
    disable_layer_streaming(model)
    gc.collect()
    assert _files_open_under(shards) == ([], [])
    assert kept.__traceback__ is not None
    # and the model streams again, exactly
    enable_layer_streaming(model, shards, device="cpu", **options)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)
    gc.collect()
    assert _files_open_under(shards) == ([], [])


@contextmanager
def _pass_held_inside_a_layer(model, inputs, layer: int = 2):
    """Another thread runs a forward pass of `model` that waits inside decoder layer `layer` for as long as the block
    runs (holding the pass lock, the layer swapped in); yields a dict that gets the pass's logits once it ends."""
    inside, go_on = threading.Event(), threading.Event()

    def hold(module, args):
        if not inside.is_set():
            inside.set()
            go_on.wait(60)

    handle = get_streaming_state(model).stack.layers[layer].mlp.register_forward_pre_hook(hold)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("logits", model(**inputs).logits))
    worker.start()
    try:
        assert inside.wait(30)
        yield out
    finally:
        go_on.set()
        worker.join(60)
        handle.remove()


def _generate_in_a_forked_child(model, inputs, pad) -> list:
    """`model.generate` in a child forked now (torch set to one thread there: its OpenMP pool hangs in a child forked
    after it ran, a plain model too); fails if the child has not finished in 60 s."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def child():
        torch.set_num_threads(1)
        results.put(model.generate(**inputs, **GEN, pad_token_id=pad).tolist())

    process = ctx.Process(target=child)
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child's generate did not finish in 60 s")
    assert process.exitcode == 0
    return results.get(timeout=5)


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
@pytest.mark.parametrize("in_place", [False, True], ids=["read_ahead", "in_place"])
def test_a_forked_child_streams_too(llama, in_place):
    """A process forked after streaming was enabled and used (gunicorn's `--preload`, a fork-based pool): the
    parent's loader threads do not exist in the child, and its first `generate` waited forever for reads no thread
    would make. The loader starts new threads and locks in the child, which gets the exact output, and so does the
    parent after it."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._in_place = in_place
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert loader._pending or in_place  # read ahead for the next pass by the parent's threads
    assert _generate_in_a_forked_child(model, inputs, pad) == expected.tolist()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs fork")
def test_a_child_forked_while_another_thread_runs_a_pass(llama):
    """Forked while another thread is inside a pass (holding the pass lock, a layer swapped in): in the child that
    thread does not exist, so the lock is new there and the layer it left in use is put back as the child's first
    pass begins; the child's output is exact."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    with _pass_held_inside_a_layer(model, inputs):
        tokens = _generate_in_a_forked_child(model, inputs, pad)
    assert tokens == expected.tolist()
    disable_layer_streaming(model)


_GENERATE_AFTER_THE_MAIN_THREAD_ENDS = """
import sys, threading
sys.path.insert(0, sys.argv[3])
import torch
from conftest import streamed_model
from transformers import AutoTokenizer
from hf_layerstream import disable_layer_streaming

ckpt, shards = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(ckpt)
inputs = tok("Hello there, streaming world", return_tensors="pt")
left, disabled = (streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2) for _ in range(2))
started = threading.Event()


def work():
    started.set()
    with torch.no_grad():
        for model in (left, disabled):
            model(**inputs)  # (passes on before the main thread has ended, to have the loader's threads working)
        main.join()  # the interpreter's exit has stopped every thread pool's threads once the main thread is done
        for name, model in (("left", left), ("disabled", disabled)):
            out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
            print(name, out[0].tolist(), flush=True)
    disable_layer_streaming(disabled)  # (the other one is left enabled: the process exits all the same)


main = threading.main_thread()
threading.Thread(target=work).start()  # (not a daemon: the interpreter waits for it at exit)
started.wait()
"""


def test_generate_in_a_thread_that_outlives_the_main_thread(llama):
    """A `generate` in a (non-daemon) thread that goes on after the main thread has ended: a script whose workers
    finish the requests, a server's main thread that returns while a worker thread still serves. Python's exit first
    stops every `concurrent.futures` thread pool (their threads leave, and later work is refused), then waits for
    such threads; the loader's pools are such pools, so that thread's next layer failed with "Loading decoder layer 0
    ... failed: RuntimeError: cannot schedule new futures after shutdown", where the loaded model finished the call.
    Once its threads are stopped so, the loader does their work in the thread that waits for it: the output is the
    loaded model's, and the process exits (no thread of ours is left to wait for), with a model left enabled and one
    disabled there. In a child process, as the exit is the process's."""
    from conftest import run_python

    ckpt, shards, *_ = llama
    ref = _models.load_reference(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    expected = ref.generate(
        **tok("Hello there, streaming world", return_tensors="pt"),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    out = run_python(_GENERATE_AFTER_THE_MAIN_THREAD_ENDS, ckpt, shards, Path(__file__).parent, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("left", "disabled"):
        assert f"{name} {expected[0].tolist()}" in out.stdout, (out.stdout, out.stderr[-3000:])


def test_acquire_after_close_raises():
    from hf_layerstream.engine import LayerLoader

    loader = LayerLoader.__new__(LayerLoader)
    loader._closed = True
    with pytest.raises(RuntimeError, match="enable_layer_streaming"):
        loader.acquire(0)


# --- scheduling -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["read_ahead", "in_place"])
def test_prefetch_runs_ahead_cyclically(llama, monkeypatch, in_place):
    """Before the first sweep, and after each sweep, the next sweep's first streamed layers are already being read
    (skipping kept layers). Except, on CPU, layers found in the page cache whose map is their whole load: those are
    mapped where they are used, in the compute thread, and nothing is read ahead for them."""
    from hf_layerstream import engine

    monkeypatch.setattr(engine, "_read_from_disk", lambda before, after, size: False)  # every map finds them warm
    ckpt, shards, inputs, expected, pad = llama
    m, resident, layer = _sizes(shards)
    model = streamed_model(ckpt, shards, max_memory={"cpu": resident + 2 * layer + 3 * layer}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._in_place = in_place
    assert loader.plan.streamed == [1, 2, 4, 5]
    # the first sweep's first streamed layers are read from the moment streaming is enabled
    assert sorted(loader._pending) == [1, 2]
    loader.wait_idle()
    assert loader.reads["mapped"] == 2
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert sorted(loader._pending) == ([] if in_place else [1, 2])
    loader.wait_idle()
    assert loader._pool.allocated <= loader.prefetch + 1
    # one map per streamed layer and sweep (the first two were the ones made at enable time), and the read-ahead
    assert loader.reads["mapped"] == 4 * GEN["max_new_tokens"] + (0 if in_place else 2)
    disable_layer_streaming(model)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
def test_buffers_bounded_by_prefetch(llama, prefetch, mapped):
    """At most `prefetch + 1` layers held (in use and read ahead) at any layer's start, and as many read buffers
    (mapped layers take none: their bound is the first)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
    loader = get_streaming_state(model).loader
    assert loader.prefetch == prefetch
    loader._map = mapped
    held, acquire = [], loader.acquire

    def counting(index):
        tensors = acquire(index)
        held.append(len(loader._pending) + len(loader._in_use))
        return tensors

    loader.acquire = counting
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    assert len(held) == 6 * GEN["max_new_tokens"] and max(held) <= prefetch + 1, held
    assert loader._pool.allocated <= prefetch + 1
    disable_layer_streaming(model)


class _InterruptedOnce:
    """A read-ahead future whose first `result()` raises KeyboardInterrupt (Ctrl-C while waiting for it)."""

    def __init__(self, future):
        self.future, self.interrupted = future, False

    def result(self):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return self.future.result()

    def __getattr__(self, name):  # (`done`, `exception`: the read's own state)
        return getattr(self.future, name)


def _interrupt_then_generate(model, inputs, pad, layer: int = 3) -> tuple[torch.Tensor, list[int]]:
    """One `generate` call interrupted (KeyboardInterrupt, as Ctrl-C raises it) inside decoder layer `layer`'s forward
    pass in its second sweep, then a whole one, whose output is returned; also returns what the loader held (layers
    in use and read ahead) at each acquire of the whole call."""
    state = get_streaming_state(model)
    loader, layers = state.loader, state.stack.layers
    sweeps = []

    def interrupt(module, args):
        sweeps.append(1)
        if len(sweeps) == 2:
            raise KeyboardInterrupt

    handle = layers[layer].mlp.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    handle.remove()
    # its post_forward never ran: the layer is put back as the exception leaves the pass
    assert loader.in_use() == []
    assert all(t.is_meta for t in layers[layer].parameters())
    held = []
    acquire = loader.acquire

    def counting(index):
        tensors = acquire(index)
        assert loader.in_use() == [index]  # a pass runs one layer at a time
        with loader._lock:
            held.append(len(loader._in_use) + len(loader._pending))
        return tensors

    loader.acquire = counting
    try:
        out = model.generate(**inputs, **GEN, pad_token_id=pad)
    finally:
        del loader.acquire
    return out, held


@pytest.mark.parametrize("way", ["in_place", "mapped", "read"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_a_pass_interrupted_inside_a_layer_leaves_nothing_behind(llama, prefetch, way):
    """Ctrl-C (or an out-of-memory error) inside a decoder layer's forward pass skips its `post_forward`: the layer
    would stay swapped in, and the layers after it were read ahead for a pass that will not come. The layer is put
    back as the exception leaves the pass; the next call gives the exact output, and what the loader holds never
    goes past the plan's (prefetch + 1) layers (without the clean-up, the stale read-ahead layers are held on top of
    the new pass's ones until the sweep reaches them; and the interrupted layer until the sweep reaches it)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
    loader = get_streaming_state(model).loader
    loader._map = way != "read"
    loader._in_place = way == "in_place"  # else every layer through the loader thread, read ahead
    out, held = _interrupt_then_generate(model, inputs, pad)
    assert torch.equal(out, expected)
    assert max(held) <= prefetch + 1, held
    assert loader.in_use() == []
    assert all(t.is_meta for layer in get_streaming_state(model).stack.layers for t in layer.parameters())
    loader.wait_idle()
    assert loader._pool.allocated <= prefetch + 1
    disable_layer_streaming(model)


def test_a_direct_call_of_a_layer_that_raised_is_put_back_at_the_next_call(llama):
    """A decoder layer called by itself (outside a pass of the model, so no `PassGuard`) whose forward raises skips
    its `post_forward`: its weights stay in. The next call of that layer puts them back first, and runs exactly;
    before, it took them for a cast of the model (`model.model.half()`) and refused to run."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    ref = _models.load_reference(ckpt)
    ids = inputs["input_ids"]
    with torch.no_grad():
        hidden = ref.model.embed_tokens(ids)
        rotary = ref.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
        expected_out = ref.model.layers[2](hidden, position_embeddings=rotary)
        layer = model.model.layers[2]
        assert torch.equal(layer(hidden, position_embeddings=rotary), expected_out)
        with pytest.raises(TypeError):  # (no `position_embeddings`: raises inside the attention)
            layer(hidden)
        assert get_streaming_state(model).loader.in_use() == [2]
        assert torch.equal(layer(hidden, position_embeddings=rotary), expected_out)
    assert get_streaming_state(model).loader.in_use() == []
    assert all(t.is_meta for t in layer.parameters())
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_cast_while_a_kept_layer_that_raised_holds_its_weights_does_not_reach_later_passes(llama):
    """A layer kept in memory, called by itself, raised: its weights (the Parameters made once and reused by every
    pass) stayed in its modules, where `layer.self_attn.half()` then `.float()` reached them: later passes reused
    them, rounded through float16 (other bits; with `_apply` putting new Parameters in, the reused ones stayed float16
    and passes failed on mixed dtypes). The cast reaches the placeholders now, and the next call, of the layer or of
    the model, refuses it as any cast there and back (the loaded model's weights would keep the rounding); a call
    that raises inside the layer leaves its values exact for the next."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)  # (every layer kept)
    ref = _models.load_reference(ckpt)
    ids = inputs["input_ids"]
    assert get_streaming_state(model).loader.plan.tier(2) == "device"
    with torch.no_grad():
        hidden = ref.model.embed_tokens(ids)
        rotary = ref.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
        expected_out = ref.model.layers[2](hidden, position_embeddings=rotary)
        layer = model.model.layers[2]
        assert torch.equal(layer(hidden, position_embeddings=rotary), expected_out)  # (its values made, kept)
        with pytest.raises(TypeError):  # (no `position_embeddings`: raises inside the attention)
            layer(hidden)
        assert not layer.self_attn.q_proj.weight.is_meta  # (still in)
        assert torch.equal(layer(hidden, position_embeddings=rotary), expected_out)
        with pytest.raises(TypeError):
            layer(hidden)
        layer.self_attn.half()
        layer.self_attn.float()
        with pytest.raises(
            RuntimeError, match=r"layer 2's self_attn\.\w+\.weight was cast to another dtype .* and back"
        ):
            layer(hidden, position_embeddings=rotary)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu")
    layer = model.model.layers[2]
    with torch.no_grad():
        assert torch.equal(layer(hidden, position_embeddings=rotary), expected_out)
        # the same, the next call a pass of the model (which puts the layer's weights back as it begins)
        with pytest.raises(TypeError):
            layer(hidden)
        layer.self_attn.half()
        layer.self_attn.float()
    assert all(t.is_meta for t in model.model.layers[1].parameters())  # (not run yet)
    with pytest.raises(RuntimeError, match=r"layer 2's self_attn\.\w+\.weight was cast to another dtype .* and back"):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu")
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert not any(
        t.is_meta for t in model.model.layers[2].parameters()
    )  # (kept layers hold their weights between passes)
    disable_layer_streaming(model)


def _held(model, index: int) -> dict[str, torch.Tensor]:
    """What a kept layer's modules hold now, by name relative to the layer."""
    return dict(model.model.layers[index].named_parameters())


def test_kept_layers_hold_their_weights_between_passes_without_asking_the_loader(llama, monkeypatch):
    """After its first pass without gradients a kept layer holds its kept weights in its modules, as a loaded model
    does: the next passes swap nothing and ask the loader for nothing (its hook's work at each pass is a flag read;
    the swap in and out with its checks cost a GPU at batch 1 several percent of a token), and stay exact. The
    weights are the loader's kept tensors (no copy); `disable_layer_streaming` puts the model back on meta and takes
    its `_apply` guards off the modules."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)  # (every layer kept)
    loader = get_streaming_state(model).loader
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    held = [_held(model, i) for i in range(6)]
    for i, weights in enumerate(held):
        kept = loader.kept(i)
        assert weights and all(w.data_ptr() == kept[n].data_ptr() and not w.is_meta for n, w in weights.items())
    acquired = []
    monkeypatch.setattr(loader, "acquire", lambda index: acquired.append(index))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert acquired == []
    assert all(_held(model, i)[n] is w for i, weights in enumerate(held) for n, w in weights.items())
    monkeypatch.undo()
    layer = model.model.layers[1]
    assert "_apply" in vars(layer.mlp.up_proj)
    disable_layer_streaming(model)
    assert all(t.is_meta for t in layer.parameters())
    assert not any("_apply" in vars(m) for m in model.modules())


def test_a_cast_or_a_load_between_passes_does_not_reach_the_weights_a_kept_layer_holds(llama):
    """Between passes a kept layer's modules hold its kept weights, which every later pass uses: a cast there
    (`layer.half()` then `.float()`: through float16 and back) or a `load_state_dict` would have changed them for good
    (for the kept layers only, not the streamed ones). Both first put the placeholders back, as the modules held
    between passes before: the cast reaches those (refused at the next passes, also once cast back: see
    test_exactness.py), the load loads into meta, and the passes after stay exact."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ids = inputs["input_ids"]
    ref = _models.load_reference(ckpt)
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(model(ids).logits, want)
        layer = model.model.layers[1]
        held = layer.self_attn.q_proj.weight
        assert not held.is_meta
        layer.half()
        assert layer.self_attn.q_proj.weight.is_meta and layer.self_attn.q_proj.weight.dtype == torch.float16
        with pytest.raises(RuntimeError, match=r"layer 1's .* was cast or moved to torch.float16"):
            model(ids)
        layer.float()
        assert held.dtype == torch.float32
        with pytest.raises(RuntimeError, match=r"layer 1's .* was cast to another dtype while streaming and back"):
            model(ids)
        assert torch.equal(held, ref.model.layers[1].self_attn.q_proj.weight)  # (not rounded)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        held = layer.self_attn.q_proj.weight
        assert not held.is_meta
        zeros = {n: torch.zeros_like(t) for n, t in ref.model.layers[1].state_dict().items()}
        with pytest.warns(UserWarning, match="to a meta parameter in the current model, which is a no-op"):
            model.model.layers[1].load_state_dict(zeros)
            model.model.layers[2].mlp.load_state_dict({n[4:]: t for n, t in zeros.items() if n.startswith("mlp.")})
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(held, ref.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("options", [{}, {"max_memory": {"cpu": 0}}], ids=["kept", "streamed"])
def test_a_module_of_a_layer_without_its_weights_called_by_itself_is_refused_not_garbage(llama, options):
    """A module of a decoder layer that does not hold its weights (a streamed layer; a kept one before its first pass),
    called by itself outside its layer's forward (probing code: `layer.mlp(x)`): torch computed with the model's meta
    weight as memory never written (`F.linear` on a CPU gave 1e32-sized sums, silently). It raises now, naming the
    weight and what to call. What a meta tensor does still works: its shape, a cast or view of it (meta),
    `load_state_dict`'s copy into it (a no-op, with torch's warning); `state_dict()` gives plain meta tensors for the
    streamed layers, which `torch.load(weights_only=True)` takes; and `disable_layer_streaming` gives the model its own
    meta weights back, requiring grad as set while streaming."""
    ckpt, shards, inputs, expected, pad = llama
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    own = model.model.layers[0].mlp.gate_proj.weight
    enable_layer_streaming(model, shards, device="cpu", **options)
    ref = _models.load_reference(ckpt)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    refused = pytest.raises(RuntimeError, match=r"Decoder layer 0's mlp\.gate_proj\.weight is brought in by layer stre")
    weight = mlp.gate_proj.weight
    assert weight.is_meta and weight.shape == own.shape and weight.dtype == own.dtype and weight is not own
    assert weight.T.is_meta and weight.to(torch.float16).dtype == torch.float16
    with torch.no_grad():
        with refused:
            mlp(x)
        with refused:
            x[0] @ weight.T
        ids = inputs["input_ids"]
        assert torch.equal(model(ids).logits, ref(ids).logits)
        if options:  # (streamed: out of its modules again after the pass)
            with refused:
                mlp(x)
        else:  # (kept: it holds its weights since that pass, as a loaded model does)
            assert torch.equal(mlp(x), ref.model.layers[0].mlp(x))
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded.keys() == ref.state_dict().keys()
    name = "model.layers.0.mlp.gate_proj.weight"
    assert loaded[name].is_meta == bool(options) and type(state[name]) is torch.Tensor
    model.requires_grad_(False)
    disable_layer_streaming(model)
    assert model.model.layers[0].mlp.gate_proj.weight is own and not own.requires_grad


@pytest.mark.parametrize("kept", [False, True], ids=["streamed", "some kept"])
def test_reading_a_streamed_weights_values_is_refused_as_a_read_not_as_a_module_called_by_itself(llama, tmp_path, kept):
    """Code reading every weight's values (`parameters_to_vector(model.parameters())`, `sum(p.norm() ...)`, a
    comparison with the loaded model's) reaches a streamed layer's placeholder with the resident weights' values, and
    was refused as a module of the layer called by itself ("Call the whole decoder layer ... or the model"): nothing
    there to call. It says that only where a module holding the weight runs (`layer.mlp(x)`, its `forward`); a read
    names what works: a forward hook on its module (tried here), the layer's file, or `save_pretrained` (tried too).
    The same single refusal, naming the first streamed layer's first weight, with every layer streamed or some kept
    (holding real tensors since the pass). `.numpy()` and `.tolist()` of a placeholder (torch's own refusal: "not
    supported for tensor subclasses", naming neither the weight nor what works) are refused as reads too."""
    import numpy as np

    ckpt, shards, inputs, expected, pad = llama
    _, resident, layer = _sizes(shards)
    budget = {"max_memory": {"cpu": resident + 5 * layer}, "prefetch": 1} if kept else {"max_memory": {"cpu": 0}}
    model = streamed_model(ckpt, shards, **budget)
    ref = _models.load_reference(ckpt)
    i = get_streaming_state(model).plan.streamed[0]
    assert i == (1 if kept else 0)
    mlp, ref_mlp = model.model.layers[i].mlp, ref.model.layers[i].mlp
    seen = []
    mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.norm()))
    with torch.no_grad():
        assert torch.equal(model(inputs["input_ids"]).logits, ref(inputs["input_ids"]).logits)
    assert len(seen) == 1 and torch.equal(seen[0], ref_mlp.down_proj.weight.norm())  # (the loaded model's)
    x = torch.randn(1, 3, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
    module = re.escape(f"Decoder layer {i}'s mlp.gate_proj.weight is brought in by layer streaming for its layer's ")
    module += r".*\(a module of the layer called by itself\?\)\. Call the whole decoder layer"
    weight = mlp.gate_proj.weight
    with torch.no_grad():
        for call in (lambda: mlp(x), lambda: mlp.forward(x), lambda: mlp.gate_proj.forward(x)):
            with pytest.raises(RuntimeError, match=module):
                call()
        reads = {
            f"Decoder layer {i}'s self_attn.q_proj.weight": [
                lambda: torch.nn.utils.parameters_to_vector(model.parameters()),
                lambda: sum(p.norm() for p in model.parameters()),
                lambda: torch.stack([p.abs().max() for p in model.parameters()]),
            ],
            f"Decoder layer {i}'s mlp.gate_proj.weight": [
                lambda: torch.equal(weight, ref_mlp.gate_proj.weight),
                lambda: torch.cat([weight.flatten(), ref_mlp.gate_proj.weight.flatten()]),
                lambda: x @ weight.T,
                lambda: weight.float().numpy(),  # (torch's own: "not supported for tensor subclasses")
                lambda: weight.detach().tolist(),
                lambda: np.asarray(weight),
                lambda: bool(torch.isnan(weight).any()),
            ],
        }
        refusals = []
        for source, calls in reads.items():
            for call in calls:
                with pytest.raises(RuntimeError) as refused:
                    call()
                refusals.append((source, str(refused.value)))
        # the same read from a forward hook on a module of a layer in its pass (where the model's forward, and that
        # layer's, hold the next layer's weights too: it was told as a module called by itself)
        j = get_streaming_state(model).plan.streamed[1]  # (the first placeholder it meets: earlier layers hold theirs)

        def read_all(module, args, output):
            with pytest.raises(RuntimeError) as refused:
                torch.nn.utils.parameters_to_vector(model.parameters())
            refusals.append((f"Decoder layer {j}'s self_attn.q_proj.weight", str(refused.value)))

        handle = mlp.register_forward_hook(read_all)
        model(inputs["input_ids"])
        handle.remove()
    assert len(refusals) == sum(map(len, reads.values())) + 1
    for source, message in refusals:
        assert message.startswith(f"{source} is brought in by layer streaming for its layer's forward pass")
        assert "called by itself" not in message and "Call the whole decoder layer" not in message
        assert "in a forward hook on its module (inside the pass)" in message
        # (the weight's file and its name there, where its values are: a quantized split's are not, see
        # test_quantized_shards)
        layer_index = int(source.split()[2].removesuffix("'s"))
        stored = f"from its shard file (tensor 'model.layers.{layer_index}.{source.split()[-1]}' of "
        assert stored + f"{shards / 'layers' / f'{layer_index:05d}.safetensors'}, with safetensors)" in message
        assert "`save_pretrained`" in message
    model.save_pretrained(tmp_path / "saved")
    saved = _models.load_reference(tmp_path / "saved")
    vector = torch.nn.utils.parameters_to_vector
    assert torch.equal(vector(saved.parameters()), vector(ref.parameters()))


@pytest.mark.parametrize("where", ["pre-hook", "hook"])
@pytest.mark.parametrize("use", ["call", "read"])
def test_a_hook_on_a_streamed_decoder_layer_itself_using_its_weights_is_told_to_hook_a_module_of_it(llama, where, use):
    """A forward hook or pre-hook registered on a streamed decoder layer itself runs outside its forward, where its
    weights come in (README, Hooks): calling a module of the layer there, or reading a weight's value, was refused as
    a module called by itself ("Call the whole decoder layer (its hook brings its weights in) or the model": the user
    had called the model) or as code reading values ("in a forward hook on its module": it was in one). It names the
    hook on the layer now, and what works: the same hook on a module of the layer, which gets the loaded model's
    values."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    ref = _models.load_reference(ckpt)
    ids = inputs["input_ids"]
    layer = model.model.layers[1]

    def hook(module, args, *output):
        if use == "call":
            module.mlp(args[0])
        else:
            module.self_attn.q_proj.weight.sum().item()

    handle = (layer.register_forward_pre_hook if where == "pre-hook" else layer.register_forward_hook)(hook)
    weight = "mlp.gate_proj" if use == "call" else "self_attn.q_proj"
    message = (
        rf"Decoder layer 1's {re.escape(weight)}\.weight is brought in by layer streaming inside its decoder layer's "
        r"forward only, .* in a forward hook or pre-hook on that decoder layer itself, .* Register the hook on a "
        r"module of the layer instead"
    )
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        model(ids)
    handle.remove()
    seen = {}
    for name, m in (("loaded", ref), ("streamed", model)):
        hooked = m.model.layers[1].self_attn

        def note(module, args, name=name):
            seen[name] = module.q_proj.weight.sum()

        handle = hooked.register_forward_pre_hook(note)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, ref(ids).logits)
        handle.remove()
    assert torch.equal(seen["streamed"], seen["loaded"])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"\(a module of the layer called by itself\?\)"):
        layer.mlp(torch.zeros(1, 2, ref.config.hidden_size))
    disable_layer_streaming(model)


_WRITE_IN_A_PASS = """
import sys
import torch
sys.path.insert(0, sys.argv[3])
import _models
from conftest import streamed_model

ckpt, shards = sys.argv[1], sys.argv[2]
ids = torch.tensor([[1, 5, 9, 17, 33, 40, 7, 3]])
models = {"loaded": _models.load_reference(ckpt), "streamed": streamed_model(ckpt, shards, max_memory={"cpu": 0})}
edits = {name: [] for name in models}
for name, model in models.items():
    def clamp(module, args, name=name):  # (a hook clamping or adding noise to a weight as its module runs)
        with torch.no_grad():
            module.weight.clamp_(-0.01, 0.01)
            edits[name].append(module.weight.abs().max().item())
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(clamp)
    with torch.no_grad():
        clamped = [model(ids).logits for _ in range(2)]
    # and in a pass with gradients to the inputs (saliency), where the streamed weights require grad
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.pow(2).mean().backward()
    clamped += [logits.detach(), embeds.grad]
    handle.remove()
    models[name] = clamped
assert edits["streamed"] == edits["loaded"] == [torch.tensor(0.01).item()] * 3, edits
assert all(torch.equal(a, b) for a, b in zip(models["streamed"], models["loaded"]))
print("ok")
"""


def test_an_in_place_write_to_a_streamed_weight_inside_its_pass_reaches_that_pass(llama):
    """A forward pre-hook writing into a streamed layer's weight in place (a clamp, noise injection) killed the process
    with SIGSEGV on CPU: the layer's tensors were views of a read-only map of its file. The map is private
    (copy-on-write): the write reaches the pass, as on the loaded model (an idempotent one gives its output), and the
    shard file is not written. In a pass with gradients to the inputs too, where the weights require grad: there the
    write (under `torch.no_grad()`, as on the loaded model) was refused, the weight being an autograd view. In a child
    process, as a regression would kill the one running it."""
    import hashlib
    import subprocess
    import sys

    ckpt, shards, *_ = llama
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((shards / "layers").iterdir())}
    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", _WRITE_IN_A_PASS, str(ckpt), str(shards), tests],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stderr[-3000:])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_a_weight_taken_out_of_its_module_is_refused_and_disable_works(llama, plan, how):
    """`torch.nn.utils.prune` / `parametrize` on a module of a decoder layer take its weight out of `_parameters`:
    the next pass raised a bare `KeyError: 'weight'`, and so did `disable_layer_streaming` where the layer held its
    weights (the model left half streaming). Now the pass refuses it, naming the weight and the way, and disable
    leaves the module as the caller made it."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    ckpt, shards, inputs, *_ = llama
    model = streamed_model(ckpt, shards, **({"max_memory": {"cpu": 0}} if plan == "streamed" else {}))
    ids = inputs["input_ids"]
    with torch.no_grad():
        model(ids)  # (kept: the layers hold their weights since)
    module = model.model.layers[1].mlp.down_proj
    if how == "prune":
        prune.l1_unstructured(module, "weight", amount=0.3)
    else:
        parametrize.register_parametrization(module, "weight", torch.nn.Identity())
    with pytest.raises(RuntimeError, match=r"Decoder layer 1's mlp.down_proj.weight was taken out of its module .*"):
        with torch.no_grad():
            model(ids)
    loader = get_streaming_state(model).loader
    disable_layer_streaming(model)
    assert get_streaming_state(model) is None and not _loader_threads(loader)
    assert "weight" not in module._parameters  # (as the caller made it)
    assert all(p.is_meta for n, p in model.model.layers[2].named_parameters())


def _one_pass(model, ids, grad: bool) -> None:
    """A forward pass without gradients, or (`grad`) one with gradients to the input embeddings, and its backward."""
    if grad:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.sum().backward()
    else:
        with torch.no_grad():
            model(ids)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad_to_inputs"])
@pytest.mark.parametrize("plan", ["kept", "streamed", "8bit_per_module"])
def test_a_weight_replaced_by_a_hook_in_a_pass_is_kept_and_refused_at_the_next(checkpoints, llama, plan, grad):
    """`module.weight = nn.Parameter(...)` from a hook inside a pass: the loaded model keeps the new weight. Where
    the layer does not hold its weights after the pass (a streamed layer; any pass with gradients; a weight
    dequantized module by module), the placeholder was put back over it silently, and the next passes computed
    without it. Now the slot keeps it, as a layer holding its weights did, and the next pass refuses it, naming the
    weight; disable puts the model back."""
    ckpt, shards, inputs, *_ = llama
    options = {"kept": {}, "streamed": {"max_memory": {"cpu": 0}}, "8bit_per_module": {"dequantize": "module"}}[plan]
    if plan == "8bit_per_module":
        ckpt, shards = checkpoints("llama", num_hidden_layers=6, compression="8bit")
    model = streamed_model(ckpt, shards, **options)
    ids = inputs["input_ids"]
    module = model.model.layers[1].mlp.down_proj
    replacement = torch.nn.Parameter(torch.zeros(module.out_features, module.in_features))
    handle = module.register_forward_pre_hook(lambda m, a: setattr(m, "weight", replacement))
    _one_pass(model, ids, grad)
    handle.remove()
    assert module.weight is replacement  # (as the loaded model keeps it)
    with pytest.raises(RuntimeError, match=r"Decoder layer 1's mlp.down_proj.weight was replaced by another tensor"):
        with torch.no_grad():
            model(ids)
    loader = get_streaming_state(model).loader
    disable_layer_streaming(model)
    assert not _loader_threads(loader) and module.weight.is_meta


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad_to_inputs"])
@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_requires_grad_set_on_a_weight_during_a_pass_stays(llama, plan, grad):
    """`weight.requires_grad_(False)` from a hook during a pass stays on a loaded model's weight. Where the layer does
    not hold its weights after the pass (a streamed layer; any pass with gradients), its placeholder did not take it:
    the model said the weight still requires grad, and the next passes computed as for one that does (which picks
    `torch.matmul`'s kernel where the layer calls it itself: FalconMamba's logits 3e-8 off). It goes to the
    placeholder now, and the next pass uses it; a weight swapped in without requiring grad (a pass with gradients
    and none to its inputs) leaves the placeholder's as it was."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **({"max_memory": {"cpu": 0}} if plan == "streamed" else {}))
    ids = inputs["input_ids"]
    modules = [layer.mlp.down_proj for layer in model.model.layers]

    def freeze(module, args):
        module.weight.requires_grad_(False)

    handles = [m.register_forward_pre_hook(freeze) for m in modules[:3]]
    _one_pass(model, ids, grad)
    for handle in handles:
        handle.remove()
    assert [m.weight.requires_grad for m in modules] == [False] * 3 + [True] * 3
    model(ids)  # (gradients on, none to the inputs: weights swapped in frozen, placeholders left as they are)
    assert [m.weight.requires_grad for m in modules] == [False] * 3 + [True] * 3
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad)) for m in modules]
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert seen[:6] == [False] * 3 + [True] * 3
    for handle in handles:
        handle.remove()
    disable_layer_streaming(model)


@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_an_edit_of_a_weight_outside_its_layers_pass_is_refused_not_dropped(llama, plan):
    """Neuron ablation or a ROME-style edit, in place, of a decoder layer's weight outside a pass (`weight[:, :8] = 0`,
    `copy_`, `zero_`, an init function) was dropped silently where the layer did not hold its weights (every streamed
    layer; a kept one before its first pass): the loaded model takes it, the streamed one computed without it. It is
    refused now, naming the weight and the fix; a kept layer's held weights take it, as the loaded model's. A read of
    its values there names where they are, not "Cannot copy out of meta tensor"."""
    ckpt, shards, inputs, *_ = llama
    model = streamed_model(ckpt, shards, **({"max_memory": {"cpu": 0}} if plan == "streamed" else {}))
    ids = inputs["input_ids"]
    weight = model.model.layers[1].mlp.down_proj.weight
    edits = {
        "slice": lambda w: w[:, :8].__setitem__(slice(None), 0),
        "index": lambda w: w.__setitem__((slice(None), slice(0, 8)), 0),
        "copy_": lambda w: w.copy_(torch.zeros(w.shape)),
        "zero_": lambda w: w.zero_(),
        "init": torch.nn.init.normal_,
        "mul_": lambda w: w.mul_(0.5),
        "detach": lambda w: w.detach().zero_(),
        "from another weight": lambda w: w.copy_(model.model.layers[2].mlp.down_proj.weight),
        "from itself": lambda w: w.add_(w),
    }
    with torch.no_grad():
        for edit in edits.values():
            with pytest.raises(RuntimeError, match=r"Decoder layer 1's mlp.down_proj.weight .* writes into it outside"):
                edit(weight)
        with pytest.raises(RuntimeError, match=r"down_proj.weight .* holds no values to read"):
            weight.sum().item()
        for move in (lambda w: w.cpu(), lambda w: w.to("cpu", torch.float64), lambda w: model.model.layers[1].cpu()):
            # (a `NotImplementedError`, as torch's own "Cannot copy out of meta tensor" was)
            with pytest.raises(NotImplementedError, match=r"Decoder layer 1.s .* has no values to move or copy"):
                move(weight)
        assert weight.half().dtype == torch.float16 and weight.T.shape == weight.shape[::-1]  # (meta: as before)
        ref = _models.load_reference(ckpt)
        assert torch.equal(model(ids).logits, ref(ids).logits)  # (nothing was written)
        # a kept layer holds its weights after a pass without gradients: an edit reaches them, as the loaded model's;
        # a streamed layer's is still refused after passes
        if plan == "kept":
            for m in (ref, model):
                m.model.layers[1].mlp.down_proj.weight[:, :8] = 0
            assert torch.equal(model(ids).logits, ref(ids).logits)
        else:
            with pytest.raises(RuntimeError, match=r"writes into it outside that pass"):
                model.model.layers[1].mlp.down_proj.weight[:, :8] = 0
    disable_layer_streaming(model)


def test_a_cast_from_another_thread_waits_for_the_pass_running(llama):
    """A cast of a kept layer's module (here one that changes nothing: `float()` of a float32 layer, which streaming
    lets through on the model too) puts its held weights out of the modules: from another thread, it waits for the
    pass running, which would lose its weights part way otherwise (every pass failed so, on meta tensors), and the
    next pass holds them again. Passes and casts taking turns as they come, all exact."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ids = inputs["input_ids"]
    with torch.no_grad():
        want = _models.load_reference(ckpt)(ids).logits
    stop, casts = threading.Event(), [0]

    def cast() -> None:
        while not stop.is_set():
            model.model.layers[2].float()
            model.float()
            casts[0] += 1

    caster = threading.Thread(target=cast)
    caster.start()
    try:
        with torch.no_grad():
            outs = [model(ids).logits for _ in range(40)]
    finally:
        stop.set()
        caster.join(30)
    assert casts[0] > 0
    assert all(torch.equal(out, want) for out in outs)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_weight_replaced_on_a_kept_layer_that_holds_its_weights_is_refused(llama):
    """`module.weight = nn.Parameter(...)` on a kept layer holding its weights: its next pass refuses it, naming it, as
    it refused one put over a placeholder before (held weights would have used it without gradients only, and the
    next pass with gradients dropped it)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ids = inputs["input_ids"]
    refused = pytest.raises(RuntimeError, match=r"layer 1's mlp\.up_proj\.weight was replaced by another tensor")
    with torch.no_grad():
        want = _models.load_reference(ckpt)(ids).logits
        assert torch.equal(model(ids).logits, want)
        up = model.model.layers[1].mlp.up_proj
        held = up.weight
        up.weight = torch.nn.Parameter(torch.zeros_like(held))
        for grad in (False, True):
            with torch.set_grad_enabled(grad), refused:
                model(ids)
        # the held weight put back (a save and restore): the layer's own again, exact
        up.weight = held
        assert torch.equal(model(ids).logits, want) and torch.equal(model(ids).logits, want)
        # `torch.func.functional_call` swaps a value in for one call, refused, and puts back the held one
        name = "model.layers.1.mlp.up_proj.weight"
        with refused:
            torch.func.functional_call(model, {name: torch.zeros_like(held)}, (ids,))
        assert up.weight is held
        assert torch.equal(model(ids).logits, want) and torch.equal(model(ids).logits, want)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def _held_after_a_pass(llama):
    """A model keeping every layer, after one exact pass without gradients (its layers hold their weights since); the
    prompt's ids and the loaded model's logits for them."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ids = inputs["input_ids"]
    with torch.no_grad():
        want = _models.load_reference(ckpt)(ids).logits
        assert torch.equal(model(ids).logits, want)
    return model, ids, want


def test_a_cast_from_a_hook_inside_a_pass_waits_for_the_pass_to_end(llama):
    """A cast that changes nothing (`model.float()`) from a forward hook inside a kept layer, during a pass: the
    layer running holds its weights, which the cast would have taken out under its feet (the rest of its forward
    met meta placeholders); they go out as the pass ends, and the next pass holds them again. Both exact. A cast of
    another layer from inside the pass is refused at the next passes, cast back too."""
    model, ids, want = _held_after_a_pass(llama)
    with torch.no_grad():
        calls = []
        q_proj = model.model.layers[2].self_attn.q_proj
        handle = q_proj.register_forward_hook(lambda m, a, o: calls.append(model.float()))
        assert torch.equal(model(ids).logits, want)
        assert calls and q_proj.weight.is_meta  # (out as the pass ended)
        handle.remove()
        assert torch.equal(model(ids).logits, want)
        assert not q_proj.weight.is_meta
        # a cast of another layer (one that ran) from inside the pass reaches its placeholders at once, as between
        # passes: refused at the next passes
        once = []
        mlp = model.model.layers[1].mlp
        hook = lambda m, a, o: once or once.append(mlp.half())  # noqa: E731
        handle = model.model.layers[3].mlp.register_forward_hook(hook)
        model(ids)
        handle.remove()
        assert mlp.up_proj.weight.is_meta and mlp.up_proj.weight.dtype == torch.float16
        with pytest.raises(RuntimeError, match=r"layer 1's mlp\.\w+\.weight was cast or moved to torch.float16"):
            model(ids)
        mlp.float()
        with pytest.raises(RuntimeError, match=r"layer 1's mlp\.\w+\.weight was cast to another dtype .* and back"):
            model(ids)
    disable_layer_streaming(model)


def _once(action):
    """A forward (pre-)hook that runs `action` at its first call only."""
    done = []

    def hook(*_):
        if not done:
            done.append(True)  # (first: the action may run the model, and this hook, again)
            action()

    return hook


@pytest.mark.parametrize("where", ["pre-hook of the next layer", "the final norm", "a streamed layer"])
def test_a_cast_from_inside_a_pass_of_a_layer_not_running_is_refused_at_the_next_pass(llama, where):
    """A cast of a kept layer holding its weights, from inside a pass but outside that layer's forward (a forward
    pre-hook of the next layer, which runs before its hook; the final norm after the last layer; a streamed layer
    of a mixed plan), reaches its placeholders at once: refused at the next pass while it stands, as between passes
    (it was taken for a cast from inside the layer's own forward, which is not followed, and the next pass ran on),
    cast back too; exact again once enabled anew."""
    ckpt, shards, inputs, expected, pad = llama
    options = {"max_memory": {"cpu": "850KB"}} if where == "a streamed layer" else {}
    model = streamed_model(ckpt, shards, **options)
    plan = get_streaming_state(model).loader.plan
    ids = inputs["input_ids"]
    with torch.no_grad():
        want = _models.load_reference(ckpt)(ids).logits
        assert torch.equal(model(ids).logits, want)
        layers = model.model.layers
        if where == "pre-hook of the next layer":
            target, handle = 1, layers[2].register_forward_pre_hook(_once(lambda: layers[1].mlp.half()))
        elif where == "the final norm":
            target, handle = 5, model.model.norm.register_forward_hook(_once(lambda: layers[5].mlp.half()))
        else:
            target = next(i for i in range(6) if plan.tier(i) == "device")
            streamed = next(i for i in plan.streamed if i > target)
            cast = _once(lambda: layers[target].mlp.half())
            handle = layers[streamed].mlp.register_forward_hook(cast)
        assert plan.tier(target) == "device"
        model(ids)
        handle.remove()
        with pytest.raises(
            RuntimeError, match=rf"layer {target}'s mlp\.\w+\.weight was cast or moved to torch.float16"
        ):
            model(ids)
        layers[target].mlp.float()
        with pytest.raises(RuntimeError, match=rf"layer {target}'s mlp\.\w+\.weight was cast to another dtype"):
            model(ids)
    disable_layer_streaming(model)
    enable_layer_streaming(model, shards, device="cpu", **options)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    disable_layer_streaming(model)


@pytest.mark.parametrize("case", ["gradients on", "a pass inside it"])
def test_a_cast_from_inside_a_layers_own_forward_is_not_followed(llama, case):
    """A cast of a layer's modules from a hook inside its own forward reaches the weights it runs with and is not
    followed after the pass: with gradients on too (the values made for such passes are made anew, not reused cast:
    the next pass with gradients failed on mixed dtypes), and after a pass of the model run inside that forward (it
    took the layer's weights out under its feet: the rest of its forward met meta placeholders)."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ids = inputs["input_ids"]
    layer = model.model.layers[3]
    with torch.no_grad():
        want = _models.load_reference(ckpt)(ids).logits
        assert torch.equal(model(ids).logits, want)
    if case == "gradients on":
        handle = layer.mlp.down_proj.register_forward_hook(_once(lambda: layer.self_attn.half()))
        grad = True
    else:

        def inner():
            model(ids)
            layer.self_attn.float()

        handle = layer.mlp.up_proj.register_forward_hook(_once(inner))
        grad = False
    with torch.set_grad_enabled(grad):
        first = model(ids).logits.detach()
    handle.remove()
    if case == "a pass inside it":
        assert torch.equal(first, want)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(model(ids).logits.detach(), want)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("where", ["layers.3.mlp.up_proj", "layers.1.self_attn", "layers.1.mlp.up_proj"])
@pytest.mark.parametrize(
    "options", [{}, STREAM_ALL, {"max_memory": {"cpu": 0}, "prefetch": 3}], ids=["default", "stream_all", "prefetch3"]
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_pass_of_the_model_from_inside_a_layer_gives_the_loaded_models_output(llama, where, options, grad):
    """A pass of the whole model run from a hook inside a decoder layer (an evaluation inside an instrumented layer),
    as the loaded model runs it: where that layer is streamed, the inner pass took its weights out (the next pass put
    back a layer left in use, and the layer's own hook swapped it out as the inner pass ran it), and the rest of the
    outer layer's forward met meta placeholders and raised. The layer under way keeps its weights now, and both
    passes give the loaded model's outputs."""
    ckpt, shards, inputs, expected, pad = llama
    ids = inputs["input_ids"]

    def run(model):
        inner = []

        def evaluate(*args):
            if not inner:  # (once: the inner pass runs this hook too)
                inner.append(None)
                inner[0] = model(ids).logits

        handle = model.model.get_submodule(where).register_forward_hook(evaluate)
        try:
            with torch.set_grad_enabled(grad):
                outer = model(ids).logits
        finally:
            handle.remove()
        return outer.detach(), inner[0].detach()

    want = run(_models.load_reference(ckpt))
    model = streamed_model(ckpt, shards, **options)
    for _ in range(2):  # (the second: with the loader's read-ahead and kept layers as the first pass left them)
        outer, inner = run(model)
        assert torch.equal(outer, want[0]) and torch.equal(inner, want[1])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want[0])
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_from_inside_a_pass_goes_on_with_it(llama):
    """Forked from a hook inside a kept layer's forward: in the child the thread that forked goes on with the pass,
    still its owner, so a cast from there (`model.float()`, which changes nothing) waits for the pass to end there too,
    not taking the running layer's weights out (it failed on meta placeholders). Exact in both processes."""
    model, ids, want = _held_after_a_pass(llama)
    parent, child = os.getpid(), []

    def fork_here(module, args, output):
        if child:
            return
        pid = os.fork()
        child.append(pid)
        if pid == 0:
            torch.set_num_threads(1)  # (torch's OpenMP pool hangs in a child forked after it ran)
            model.float()

    handle = model.model.layers[2].self_attn.q_proj.register_forward_hook(fork_here)
    try:
        with torch.no_grad():
            exact = torch.equal(model(ids).logits, want)
    except BaseException:
        exact = False
    if os.getpid() != parent:
        os._exit(0 if exact else 1)
    handle.remove()
    for _ in range(600):
        done, status = os.waitpid(child[0], os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(child[0], 9)
        pytest.fail("the forked child did not finish its pass in 60 s")
    assert exact and os.waitstatus_to_exitcode(status) == 0
    disable_layer_streaming(model)


def test_a_module_of_a_kept_layer_copies_and_pickles_as_a_plain_module(llama):
    """A module of a layer holding its weights carries the guard on its `_apply` (see `hooks._MethodGuard`): a copy
    (`copy.deepcopy`, as PEFT's `modules_to_save` makes; `torch.save`) is a plain module with the weights it held,
    whose casts reach its own weights and leave the layer's alone."""
    import copy
    import io

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ref = _models.load_reference(ckpt)
    mlp = model.model.layers[1].mlp
    for held in (False, True):
        if held:
            assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
        copied = copy.deepcopy(mlp)
        buf = io.BytesIO()
        torch.save(mlp.up_proj, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        if held:
            assert torch.equal(copied.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight)
            assert torch.equal(loaded.weight, ref.model.layers[1].mlp.up_proj.weight)
            copied.half()
            loaded.half()
            assert copied.up_proj.weight.dtype == loaded.weight.dtype == torch.float16
            assert mlp.up_proj.weight.dtype == torch.float32 and not mlp.up_proj.weight.is_meta
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_kept_layers_holding_their_weights_read_ahead_as_they_run(llama, monkeypatch):
    """In a plan that keeps some layers and streams the others, a kept layer holding its weights asks the loader for
    nothing, but it still keeps the streamed layers after it loading ahead, as its `acquire` did."""
    ckpt, shards, inputs, expected, pad = llama
    per_layer = ShardDirectory(shards).unit(layer_unit(0)).logical_nbytes
    resident = ShardDirectory(shards).unit("resident").logical_nbytes
    model = streamed_model(ckpt, shards, max_memory={"cpu": resident + 5 * per_layer}, prefetch=1)
    loader = get_streaming_state(model).loader
    kept = [i for i in range(6) if loader.plan.tier(i) == "device"]
    assert kept and loader.plan.streamed
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    scheduled, acquired = [], []
    schedule, acquire = loader._schedule_after, loader.acquire
    monkeypatch.setattr(loader, "_schedule_after", lambda index: (scheduled.append(index), schedule(index)))
    monkeypatch.setattr(loader, "acquire", lambda index: (acquired.append(index), acquire(index))[1])
    with torch.no_grad():
        model(inputs["input_ids"])
    assert set(kept) <= set(scheduled)
    assert not set(kept) & set(acquired) and set(acquired) == set(loader.plan.streamed)
    monkeypatch.undo()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_a_module_two_layers_share_is_swapped_at_every_pass(llama):
    """Where a module holding weights is the same object in two decoder layers (the split stored each layer's own),
    the layers swap their weights in at every pass, as before: held between passes, one's would have stood in for the
    other's. The layers that share nothing hold theirs."""
    from transformers import AutoConfig

    ckpt, shards, inputs, expected, pad = llama
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    model.model.layers[2].mlp = model.model.layers[1].mlp
    enable_layer_streaming(model, shards, device="cpu")
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert all(t.is_meta for i in (1, 2) for t in model.model.layers[i].parameters())
    assert not any(t.is_meta for t in model.model.layers[3].parameters())
    disable_layer_streaming(model)


def test_a_pass_with_gradients_takes_out_what_kept_layers_hold(llama):
    """With gradients on, a kept layer's weights run as streamed ones (frozen; in a pass with gradients to its
    inputs, as here, requiring grad as loaded but keeping no `.grad`, new at each such pass): the weights it held
    since a pass without gradients (requiring grad as loaded) are taken out first. A `requires_grad_` set on them while held goes to the placeholders, which the next pass reads:
    frozen while held, then a pass with gradients, then one without: still frozen; and unfrozen after that pass with
    gradients (on the placeholders): the next pass's weights require grad again; and the other way round."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)
    ref = _models.load_reference(ckpt)
    ids = inputs["input_ids"]
    q_proj = model.model.layers[1].self_attn.q_proj
    seen = []
    q_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert seen[-1] and q_proj.weight.requires_grad and not q_proj.weight.is_meta  # (held, as loaded)
    embeds = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref(inputs_embeds=embeds).logits.pow(2).mean().backward()
    want = embeds.grad
    embeds = embeds.detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.pow(2).mean().backward()
    assert torch.equal(embeds.grad, want)
    assert seen[-1] is True and all(p.grad is None for p in model.parameters())
    assert q_proj.weight.is_meta  # (taken out: the next pass without gradients holds them again)
    with torch.no_grad():
        model(ids)
    assert seen[-1] and not q_proj.weight.is_meta
    model.requires_grad_(False)  # (reaches the weights held)
    model(ids)  # (gradients on: takes them out)
    with torch.no_grad():
        model(ids)
    assert seen[-1] is False and not q_proj.weight.is_meta and not q_proj.weight.requires_grad
    model.requires_grad_(True)  # (held)
    model(ids)
    model.requires_grad_(False)  # (on the placeholders)
    with torch.no_grad():
        model(ids)
    assert seen[-1] is False and not q_proj.weight.requires_grad
    model(ids)
    model.requires_grad_(True)
    with torch.no_grad():
        model(ids)
    assert seen[-1] is True and q_proj.weight.requires_grad
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    # a held weight saved, then out of the model (a pass with gradients), frozen meanwhile, put back: its placeholder
    # again, frozen as the model now is (the saved weight did not follow the freezing)
    with torch.no_grad():
        model(ids)
    saved = q_proj.weight
    model(ids)
    model.requires_grad_(False)
    q_proj.weight = saved
    assert saved.requires_grad
    with torch.no_grad():
        model(ids)
    assert seen[-1] is False and not q_proj.weight.requires_grad
    model.requires_grad_(True)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    model.requires_grad_(False)  # (held: disabling keeps it, as for a model frozen between passes before)
    disable_layer_streaming(model)
    assert not any(p.requires_grad for p in model.model.layers.parameters())


def test_interrupted_again_while_letting_go_of_stale_layers_loses_nothing(llama):
    """Ctrl-C in a pass, then again as the next pass lets go of the first one's read-ahead layers (waiting for one):
    the ones not let go yet stay read ahead, and the pass after lets them go; no read buffer goes missing."""
    ckpt, shards, inputs, expected, pad = llama
    prefetch = 2
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
    state = get_streaming_state(model)
    loader = state.loader
    loader._map, loader._in_place = False, False
    handle = state.stack.layers[2].mlp.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    handle.remove()
    assert sorted(loader._pending) == [3, 4]
    loader._pending[3] = _InterruptedOnce(loader._pending[3])
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert 3 in loader._pending and 4 in loader._pending  # not lost: let go by the next pass
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    assert loader._pool.allocated <= prefetch + 1
    disable_layer_streaming(model)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_interrupted_while_waiting_for_a_layer_loses_nothing(llama, mapped):
    """Ctrl-C while the compute thread waits for a layer the loader reads: the read goes on, and its result (a read
    buffer, or a populated map) is not lost with the interrupted call: the next pass lets it go as it begins, or uses
    it. Without that, the read buffer never went back to the pool, which then held prefetch + 2 buffers."""

    ckpt, shards, inputs, expected, pad = llama
    prefetch = 2
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = mapped, False
    schedule = loader._schedule_after

    def schedule_then_interrupt(index):
        schedule(index)
        if index == 2 and 4 in loader._pending and not isinstance(loader._pending[4], _InterruptedOnce):
            loader._pending[4] = _InterruptedOnce(loader._pending[4])

    loader._schedule_after = schedule_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    del loader._schedule_after
    assert 4 in loader._pending  # handed back, as read ahead
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    assert loader._pool.allocated <= prefetch + 1
    assert loader.in_use() == []
    disable_layer_streaming(model)


@pytest.mark.parametrize("stale", [False, True], ids=["while_checked", "found_stale"])
def test_interrupted_while_a_layer_read_ahead_is_checked_loses_nothing(llama, monkeypatch, stale):
    """Ctrl-C while `acquire` checks a layer read ahead against its file (`_still_sound`, one `stat`), or just after
    it found it read before `verify` (let go, to be read again): the layer, let go there, was handed back as read
    ahead, and the next call failed with `KeyError: 'input_layernorm.weight'` (its tensors were gone)."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    assert 1 in loader._pending  # (read ahead at enable)
    found_stale, interrupted = [], []

    def check_file(header, st):  # (the check of a layer read ahead, at its use)
        if not interrupted and sys._getframe(1).f_code.co_name == "_still_sound":
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_check(header, st)

    def still_sound(index, ready):  # (as where `verify` read the headers anew since it was read)
        loader._let_go(index, ready)
        found_stale.append(index)
        return False

    def submit(index):  # (then Ctrl-C before it is read again)
        if found_stale and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_submit(index)

    real_check, real_submit = engine._check_file, loader._submit
    if stale:
        monkeypatch.setattr(loader, "_still_sound", still_sound)
        monkeypatch.setattr(loader, "_submit", submit)
    else:
        monkeypatch.setattr(engine, "_check_file", check_file)
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert interrupted
    monkeypatch.undo()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert loader.in_use() == []
    disable_layer_streaming(model)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_handing_a_read_to_a_started_loader_thread_takes_no_lock_a_ctrl_c_can_keep(llama, mapped):
    """`ThreadPoolExecutor.submit` asks its idle semaphore whether a thread is free, a `threading.Semaphore` whose
    `Condition` is entered in Python code: a Ctrl-C landing as that took its lock (the compute thread hands reads over
    at every layer) left the lock taken, and the next `generate` hung for good, the compute thread in `submit` and the
    loader thread releasing the semaphore after its task (the read path; found by a Ctrl-C fuzz, once in ~840). Once
    its thread runs, handing a read over does not touch the semaphore from the main thread, where Python runs signal
    handlers."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = mapped, False
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)  # (its threads started)

    class Watched:
        def __init__(self, semaphore):
            self.semaphore, self.in_main = semaphore, 0

        def acquire(self, *args, **kwargs):
            self.in_main += threading.current_thread() is threading.main_thread()
            return self.semaphore.acquire(*args, **kwargs)

        def release(self, *args, **kwargs):
            return self.semaphore.release(*args, **kwargs)

    pools = [p for p in (loader._executor, *loader._mappers) if p._threads]
    assert pools
    for pool in pools:
        pool._idle_semaphore = Watched(pool._idle_semaphore)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert [pool._idle_semaphore.in_main for pool in pools] == [0] * len(pools)
    disable_layer_streaming(model)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_waiting_for_a_layer_takes_no_lock_a_ctrl_c_can_keep(llama, mapped):
    """The compute thread waits for the loader's read of a layer at every layer. A `concurrent.futures.Future` is
    waited for inside its `threading.Condition`, entered in Python code: a Ctrl-C landing just after it took its lock
    left the lock taken, and the loader thread hung setting that read's result, with every read queued after it (the
    next pass waiting for one of those, or `disable_layer_streaming` for the thread, hung for good). No Python-level
    `Condition` is entered in the main thread, where Python runs signal handlers, by a call of ours in a `generate`
    (its threads started), nor in a pass interrupted and the one after it."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = mapped, False
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)  # (its threads started)
    ours = os.path.dirname(sys.modules["hf_layerstream"].__file__)
    entered, calls = [], []

    def profile(frame, event, arg):
        if event != "call":
            return
        if frame.f_code.co_name == "acquire" and frame.f_code.co_filename.startswith(ours):
            calls.append(1)
        if frame.f_code is threading.Condition.__enter__.__code__:
            caller = frame.f_back
            while caller is not None and not caller.f_code.co_filename.startswith(ours):
                caller = caller.f_back
            if caller is not None:
                entered.append(f"{frame.f_back.f_code.co_name} from {caller.f_code.co_name}")

    interrupted = []

    def interrupt(module, args):
        if not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt

    handle = get_streaming_state(model).stack.layers[2].register_forward_pre_hook(interrupt)
    sys.setprofile(profile)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(**inputs, **GEN, pad_token_id=pad)
        out = model.generate(**inputs, **GEN, pad_token_id=pad)
    finally:
        sys.setprofile(None)
        handle.remove()
    assert torch.equal(out, expected)
    assert interrupted and len(calls) > 20 and entered == []
    disable_layer_streaming(model)


def test_interrupted_just_after_a_wait_for_a_layer_took_its_lock(llama, monkeypatch):
    """A Ctrl-C landing as the compute thread's wait for a layer's load (begun while the load ran) has taken its lock,
    before it gives it back: the lock stays taken, but nothing waits on it again (the loader thread only gives it, and
    the load's outcome is read without it), and the next `generate` gives the same tokens. With a
    `concurrent.futures.Future` in its place, the loader thread hung setting that load's result, and the next pass
    with it."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map, loader._in_place = False, False
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    gate, load = threading.Event(), loader._load_in_loader  # (the loads from here on wait for it)
    monkeypatch.setattr(loader, "_load_in_loader", lambda *a: (gate.wait(10), load(*a))[1])
    wait, taken = engine._Load._wait, []

    def interrupted(load):
        if taken or load.done():  # (not the layers read ahead before the gate)
            return wait(load)
        threading.Timer(0.05, gate.set).start()  # (the load goes on once the wait has begun)
        load._signal.acquire()
        taken.append(load)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine._Load, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert taken and taken[0]._signal.locked()
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    assert taken[0].done() and loader.in_use() == []
    disable_layer_streaming(model)
    assert not [t for t in loader._executor._threads if t.is_alive()]


def test_interrupted_as_a_kept_layer_first_holds_its_weights(llama):
    """Ctrl-C in a kept layer's first pass just after its hook marked its weights installed, before it noted which
    (`_held`): the pass's clean-up indexed the empty list and an `IndexError` replaced the KeyboardInterrupt."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)  # (the default plan keeps every layer, holding its weights between passes)
    hook = get_streaming_state(model).stack.layers[1]._hf_hook
    assert hook.holds_between

    class InterruptedOnce(type(hook)):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "_installed" and value:
                object.__setattr__(self, "__class__", base)  # (once)
                raise KeyboardInterrupt

    base = type(hook)
    hook.__class__ = InterruptedOnce
    with pytest.raises(KeyboardInterrupt) as caught:
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert type(hook) is base and caught.type is KeyboardInterrupt
    assert all(t.is_meta for t in get_streaming_state(model).stack.layers[1].parameters())  # (put back)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("options", [STREAM_ALL, {}], ids=["streamed", "resident"])
def test_generate_from_several_threads_at_once(llama, options):
    """A server's worker threads calling `generate` on one model at once: the hooks swap weights into modules every
    pass shares, so passes run one at a time (without that, three of four threads failed with a meta-device error
    and the fourth produced a wrong output). Every call gives its prompt's exact output."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, **options)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [_models.SAMPLE_PROMPTS[i % 3] for i in range(4)]
    ref = _models.load_reference(ckpt)
    wanted = [ref.generate(**tok(p, return_tensors="pt"), **GEN, pad_token_id=pad) for p in prompts]
    generate_from_threads(model, tok, prompts, wanted, **GEN, pad_token_id=pad)
    assert get_streaming_state(model).loader.in_use() == []
    disable_layer_streaming(model)


def test_disable_waits_for_a_pass_running_in_another_thread(llama):
    """`disable_layer_streaming` while another thread's forward pass runs: it waits for that pass, which ends on the
    weights it began with (a `generate` running there fails at its next pass, the model being meta again)."""
    ckpt, shards, inputs, expected, pad = llama
    with torch.no_grad():
        want = _models.load_reference(ckpt)(**inputs).logits
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    layers = get_streaming_state(model).stack.layers
    with _pass_held_inside_a_layer(model, inputs) as out:
        disabling = threading.Thread(target=disable_layer_streaming, args=(model,))
        disabling.start()
        disabling.join(0.5)
        assert disabling.is_alive(), "disable waits for the pass running"
    disabling.join(60)
    assert torch.equal(out["logits"], want)  # the pass finished on the weights it began with, exact
    assert get_streaming_state(model) is None
    assert all(t.is_meta for t in layers[2].parameters())


@pytest.mark.parametrize("options", [{}, STREAM_ALL], ids=["default", "stream_all"])
def test_disable_waits_for_the_head_of_a_call_running_in_another_thread(llama, options):
    """`disable_layer_streaming` while another thread's call went from the pass over the layers to the output head:
    only that pass was waited for, and the head, given the model's meta weight back, computed on memory never written
    (torch on a CPU) and returned that, silently (logits ~1e30 off). It waits for the whole call now, which ends on the
    weights it began with."""
    ckpt, shards, inputs, expected, pad = llama
    with torch.no_grad():
        want = _models.load_reference(ckpt)(**inputs).logits
    model = streamed_model(ckpt, shards, **options)
    at_head, out = threading.Event(), {}

    def slow_head(module, args):
        at_head.set()
        time.sleep(0.3)

    model.lm_head.register_forward_pre_hook(slow_head)

    def call():
        with torch.no_grad():
            out["logits"] = model(**inputs).logits

    caller = threading.Thread(target=call)
    caller.start()
    assert at_head.wait(60)
    disable_layer_streaming(model)
    caller.join(60)
    assert torch.equal(out["logits"], want)
    assert get_streaming_state(model) is None and all(p.is_meta for p in model.parameters())


def test_read_buffers_fit_every_streamed_layer(tmp_path):
    """Layers read into buffers (CUDA staging; CPU where not mapped) of different file sizes (dense and MoE layers):
    every buffer is taken at the largest streamed file's size, so any idle buffer fits the next layer and the pool
    stays at `prefetch + 1` buffers (on CUDA a smaller idle buffer would be passed over and another one pinned)."""
    from hf_layerstream import split_checkpoint

    config = _models.make_config("qwen3_moe", 6, mlp_only_layers=[0, 3], moe_intermediate_size=128)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    sizes = [ShardDirectory(shards).unit(layer_unit(i)).size for i in range(6)]
    assert len(set(sizes)) == 2 and abs(sizes[0] - sizes[1]) > 4096  # (they differ by more than a page)
    ids = torch.randint(5, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    reference = streamed_model(ckpt, shards)
    with torch.no_grad():
        expected = reference(ids).logits
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    loader._map = False
    asked = []
    real_take = loader._pool.take
    loader._pool.take = lambda size, limit=None: asked.append(size) or real_take(size, limit)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).logits, expected)
    loader.wait_idle()
    assert len(asked) >= 6 and set(asked) == {max(sizes)}, asked
    assert loader._pool.allocated <= loader.prefetch + 1
    disable_layer_streaming(model)
    disable_layer_streaming(reference)


@pytest.mark.parametrize(
    "options",
    [
        {"max_memory": {"cpu": 0}, "prefetch": 1, "map": True},
        {"max_memory": {"cpu": 0}, "prefetch": 1, "map": False},
        {"map": True},  # the default plan: every layer kept (as a file map too, on CPU)
    ],
    ids=["mapped", "read", "kept"],
)
def test_weights_computed_on_start_on_cache_lines(llama, options):
    """Every weight the forward pass multiplies with, streamed, kept or resident, starts on a 64-byte cache line,
    as in memory torch allocates (8 bytes off, a bf16 matrix-vector product ran 8-10% slower here)."""
    ckpt, shards, inputs, expected, pad = llama
    options = dict(options)
    mapped = options.pop("map")
    model = streamed_model(ckpt, shards, **options)
    loader = get_streaming_state(model).loader
    loader._map = mapped
    offsets: dict[str, int] = {}

    def record(module, args):
        for name, p in module.named_parameters(recurse=False):
            offsets[f"{names[module]}.{name}"] = p.data_ptr() % 64

    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or type(m).__name__.endswith("RMSNorm")
    ]
    try:
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    finally:
        for h in handles:
            h.remove()
        disable_layer_streaming(model)
    n_layers = model.config.num_hidden_layers
    assert len([k for k in offsets if ".layers." in k]) >= 9 * n_layers  # 7 matrices and 2 norms in each layer
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(offsets)
    assert {k: v for k, v in offsets.items() if v} == {}


def test_directories_split_before_alignment_are_named(llama, monkeypatch, caplog):
    """A directory whose files do not start their data on cache lines (as the splits of earlier versions) gets one
    warning that says how to fix it; an aligned one gets none."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    offset = ShardDirectory(shards).header("resident").data_offset
    assert offset % engine.DATA_ALIGN == 0
    for align, warned in ((engine.DATA_ALIGN, False), (2 * offset, True)):
        monkeypatch.setattr(engine, "DATA_ALIGN", align)
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_layerstream"):
            model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
        disable_layer_streaming(model)
        messages = [r.getMessage() for r in caplog.records if "older hf_layerstream" in r.getMessage()]
        assert len(messages) == warned, messages
        assert not warned or (str(shards) in messages[0] and "Split the checkpoint again" in messages[0])


def test_a_budget_below_the_least_the_plan_needs_is_warned_about(llama, caplog, capsys):
    """A `max_memory` that cannot hold the resident parts and the layers in flight gets one warning, at enable time and
    in `inspect`, with the peak to expect and what `prefetch` saves; a budget of 0 (every layer streamed, the usual
    way to ask for it) and one that holds the working set get none."""
    import json

    from hf_layerstream.cli import main

    ckpt, shards, inputs, expected, pad = llama
    m, resident, layer = _sizes(shards)
    least = resident + 3 * layer  # prefetch 2: 3 layers in flight
    for budget, warned in ((least - 1, True), (least, False), (0, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_layerstream"):
            model = streamed_model(ckpt, shards, max_memory={"cpu": budget}, prefetch=2)
        assert get_streaming_state(model).plan.streamed == list(range(6))
        disable_layer_streaming(model)
        messages = [r.getMessage() for r in caplog.records if "cannot hold" in r.getMessage()]
        assert len(messages) == warned, messages
        # (in a unit that shows this small model's sizes: KiB, not 0.00 GiB)
        assert not warned or (
            "3 layers in flight with prefetch=2" in messages[0] and f"{least / 2**10:.1f} KiB." in messages[0]
        )
        argv = ["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", f"cpu={budget}", "--prefetch", "2"]
        assert main(argv) == 0
        assert (json.loads(capsys.readouterr().out)["warning"] is not None) == warned


def test_default_prefetch_on_cpu_fits_a_cpu_budget(llama, monkeypatch, caplog):
    """`enable_layer_streaming` on CPU with a `max_memory["cpu"]` too small for the resident parts and the default's
    four layers in flight: the default prefetch is lowered until they fit (and says so), an explicit one is kept, and
    the output is the same. Too little available memory does not lower it (see `fit_prefetch`)."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    plan = get_streaming_state(model).plan
    disable_layer_streaming(model)
    assert plan.prefetch == 3
    two_in_flight = plan.resident_bytes + 2 * max(plan.layer_bytes)
    monkeypatch.setattr(engine, "available_host_memory", lambda: two_in_flight)
    with caplog.at_level("INFO", logger="hf_layerstream"):
        model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    assert get_streaming_state(model).plan.prefetch == 3 and "prefetch lowered" not in caplog.text
    disable_layer_streaming(model)
    monkeypatch.setattr(engine, "available_host_memory", lambda: 2**40)
    for budget, prefetch in ((two_in_flight, 1), (two_in_flight + max(plan.layer_bytes), 2)):
        caplog.clear()
        with caplog.at_level("INFO", logger="hf_layerstream"):
            model = streamed_model(ckpt, shards, max_memory={"cpu": budget})
        assert get_streaming_state(model).plan.prefetch == prefetch
        assert f"prefetch lowered to {prefetch} from the default 3: max_memory['cpu'] (" in caplog.text
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
        disable_layer_streaming(model)
    model = streamed_model(ckpt, shards, max_memory={"cpu": two_in_flight}, prefetch=3)
    assert get_streaming_state(model).plan.prefetch == 3
    disable_layer_streaming(model)


def test_a_prefetch_beyond_the_layers_is_shown_as_the_loader_runs_it(checkpoints, caplog, capsys):
    """The loader reads at most n - 1 layers ahead; the plan showed (and budgeted) the `prefetch` asked, 8 for a
    6-layer model. The default (3 on CPU) for a 2-layer model is 1 then, which is not a budget's lowering. A `prefetch`
    given beyond it was lowered without a word: it is warned of, once, by `enable_layer_streaming` and by `inspect`
    (with the option's name), as the other options the plan does not take as given (`reserve` on CPU) are."""
    from hf_layerstream.cli import main

    ckpt, shards = checkpoints("llama", num_hidden_layers=2)
    warning = (
        "`prefetch` (8) is more layers than can be read ahead of the compute, at most one fewer than the model's 2 "
        "layers: the plan reads 1 ahead. Pass prefetch=1 or less."
    )
    for prefetch in (None, 1, 8):
        caplog.clear()
        with caplog.at_level("INFO", logger="hf_layerstream"):
            model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
        plan = get_streaming_state(model).plan
        assert plan.prefetch == 1 and "prefetch 1" in plan.summary(), prefetch
        assert "prefetch lowered" not in caplog.text
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "`prefetch`" in r.getMessage()]
        assert warned == ([warning] if prefetch == 8 else []), prefetch
        disable_layer_streaming(model)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", "cpu=0", "--prefetch", "8"]) == 0
    assert "(prefetch 1)" in capsys.readouterr().out
    assert caplog.text.count("`--prefetch` (8) is more layers than can be read ahead") == 1
    assert "Pass --prefetch 1 or less." in caplog.text


@pytest.mark.parametrize("keep", [None, True, False])
def test_page_cache_share_in_the_plan(llama, keep, monkeypatch):
    from hf_layerstream import engine

    _, shards, *_ = llama
    sd = ShardDirectory(shards)
    layer = sd.unit("layers.0").size
    # 10 layers' worth of page cache at the default share: all 6 streamed layers fit (beside 2 of read-ahead)
    monkeypatch.setattr(engine, "available_host_memory", lambda: int(10 * layer / engine.DEFAULT_PAGE_CACHE_SHARE))
    plan = plan_residency(sd, torch.device("cpu"), max_memory={"cpu": 0}, prefetch=1, keep_in_page_cache=keep)
    assert plan.streamed == list(range(6))
    expected = {None: list(range(6)), True: list(range(6)), False: []}[keep]
    assert plan.page_cache_layers == expected
    assert plan.to_dict()["page_cache_layers"] == expected
    assert all(plan.keeps_in_page_cache(i) == (i in expected) for i in range(6))
    # with room for 3 streamed layers (and 2 of read-ahead: prefetch 1), the default keeps 3, spread out
    monkeypatch.setattr(engine, "available_host_memory", lambda: int(5.5 * layer / engine.DEFAULT_PAGE_CACHE_SHARE))
    plan = plan_residency(sd, torch.device("cpu"), max_memory={"cpu": 0}, prefetch=1, keep_in_page_cache=keep)
    expected = {None: [0, 2, 4], True: list(range(6)), False: []}[keep]
    assert plan.page_cache_layers == expected
    # CUDA (explicit budgets: no GPU needed): the pinned host-tier layers (here 2) and the staging buffers
    # ((prefetch + 1) layers) take host RAM too: room for 3 layers of page cache in 7, and 2 when the plan pins 3
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(engine, "available_host_memory", lambda: int(7.5 * layer / engine.DEFAULT_PAGE_CACHE_SHARE))
    for pinned, cached in ((2, 3), (3, 2)):
        budget = {0: 0, "cpu": (pinned + 2) * layer}
        plan = plan_residency(sd, cuda, max_memory=budget, prefetch=1, reserve=0, keep_in_page_cache=keep)
        assert len(plan.host_layers) == pinned
        expected = {None: _spread(plan.streamed, cached), True: plan.streamed, False: []}[keep]
        assert plan.page_cache_layers == expected, (plan.host_layers, plan.streamed)


def test_a_plan_reads_the_available_memory_once(llama, monkeypatch):
    """The default host budget and the page cache's room come from one reading of the available memory (each reads
    /proc and the cgroup's files), and none is taken where both are given."""
    from hf_layerstream import engine

    _, shards, *_ = llama
    sd = ShardDirectory(shards)
    readings = []
    monkeypatch.setattr(engine, "available_host_memory", lambda: readings.append(1) or 2**40)
    plan = plan_residency(sd, torch.device("cpu"), prefetch=1)
    assert len(readings) == 1 and plan.budgets["cpu"] == int(engine.DEFAULT_HOST_SHARE * 2**40)
    plan_residency(sd, torch.device("cpu"), max_memory={"cpu": 0}, prefetch=1)  # (the page cache's room)
    plan_residency(sd, torch.device("cpu"), prefetch=1, keep_in_page_cache=False)  # (the host budget)
    assert len(readings) == 3
    plan_residency(sd, torch.device("cpu"), max_memory={"cpu": 0}, prefetch=1, keep_in_page_cache=True)
    assert len(readings) == 3


def test_cold_files_are_mapped_and_stay_in_the_page_cache(llama, tmp_path):
    """CPU: cold layer files are mapped (read in by the kernel's read-ahead), the output is unchanged, and with room
    in the page cache the pages stay there, so the next sweep is warm."""
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    files = sorted((shards / "layers").glob("*.safetensors"))
    drop_or_skip(files)  # before streaming starts: it reads the first layer ahead at once
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    loader = get_streaming_state(model).loader
    assert loader.plan.page_cache_layers == loader.plan.streamed == list(range(6))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    assert loader.reads["mapped"] >= 4 * 6 and loader.reads["direct"] == loader.reads["page_cache"] == 0
    assert all(cached_share(p) == 1.0 for p in files)
    disable_layer_streaming(model)


@pytest.mark.parametrize(
    "mapped, how",
    [(True, "no room"), (True, "option"), (False, "no room"), (False, "buffered")],
    ids=["mapped", "mapped-option", "read", "read-buffered"],
)
def test_without_page_cache_room_layers_leave_the_cache(llama, tmp_path, monkeypatch, mapped, how):
    """A model larger than the page-cache share (or `keep_in_page_cache=False`): mapped layers are dropped from the
    page cache after use, and reads (the CUDA path) use O_DIRECT where the file system allows it, else read through
    the page cache and drop the file from it at once; output unchanged."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    files = sorted((shards / "layers").glob("*.safetensors"))
    drop_or_skip(files)  # before streaming starts: it reads the first layer ahead at once
    if how in ("no room", "buffered"):
        monkeypatch.setattr(engine, "DEFAULT_PAGE_CACHE_SHARE", 0.0)  # the default plan when the model does not fit
        model = streamed_model(ckpt, shards, **STREAM_ALL)
    else:
        model = streamed_model(ckpt, shards, keep_in_page_cache=False, **STREAM_ALL)
    loader = get_streaming_state(model).loader
    assert loader.plan.page_cache_layers == []
    assert "0 of those left in the page cache" in loader.plan.summary()
    loader.wait_idle()  # the first layer, read ahead at enable time, is mapped
    loader._map = mapped
    if how == "buffered":
        loader._direct = False  # (as where the file system refuses O_DIRECT)
    drop_from_page_cache(files)  # enabling read each file's header, and the kernel's read-ahead the rest of it
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    if how == "buffered":
        loader.wait_idle()
        assert loader.reads["page_cache"] >= 4 * 5 and not loader.reads["direct"]
        # every file read since is out of the page cache again (layer 0's map, made at enable, is another matter)
        assert not any(cached_share(p) for p in files[1:]), [cached_share(p) for p in files]
    disable_layer_streaming(model)  # waits for the loader: the last unmaps and evictions are done
    assert sum(loader.reads.values()) >= 4 * 6
    if mapped:
        assert loader.reads["mapped"] >= 4 * 6
        assert not any(cached_share(p) for p in files)
    elif loader._direct:
        assert loader.reads["direct"] > 0


def test_parts_cover_the_range_on_aligned_bounds():
    from hf_layerstream.engine import _PARALLEL_MIN_BYTES, _PART_ALIGN, _parts

    mib = 2**20
    for start, end, count in [(0, 90 * mib, 4), (312, 90 * mib + 123, 4), (0, 9 * mib, 4), (4097, 50 * mib, 3)]:
        parts = _parts(start, end, count)
        assert 1 < len(parts) <= count
        assert parts[0][0] == start and parts[-1][1] == end
        assert all(a[1] == b[0] and b[0] % _PART_ALIGN == 0 for a, b in zip(parts, parts[1:]))
        assert all(hi > lo for lo, hi in parts)
    assert _parts(0, _PARALLEL_MIN_BYTES - 1, 4) == [(0, _PARALLEL_MIN_BYTES - 1)]
    assert _parts(0, 90 * mib, 1) == [(0, 90 * mib)]


def _small_parts(monkeypatch, tmp_path, shards):
    """Shards copied, and the loader's reads cut into parts on 4 KiB bounds (the tiny model's layer files are far
    below the size where parts start); records every part read: (file, lo, hi, thread)."""
    from hf_layerstream import engine

    shards = _copy_shards(shards, tmp_path)
    files = sorted((shards / "layers").glob("*.safetensors"))
    assert min(p.stat().st_size for p in files) > 4 * 4 * 4096
    monkeypatch.setattr(engine, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(engine, "_PART_ALIGN", 4096)
    seen = []
    real = engine._read_part

    def recording(fd, view, lo, hi, limit, path, size):
        seen.append((os.path.basename(path), lo, hi, threading.current_thread().name))
        return real(fd, view, lo, hi, limit, path, size)

    monkeypatch.setattr(engine, "_read_part", recording)
    return shards, seen


def _drop_after_enable(loader, shards):
    """Drop the layer files from the page cache once `enable_layer_streaming` is done (reading the headers of the tiny
    files brought all of them in: they are smaller than the kernel's read-ahead). The layers read ahead at enable time
    as maps (before the test turned maps off: with `prefetch=2`, the second too, where the loader thread began it by
    then) stay in the page cache while mapped: they are not checked."""
    loader.wait_idle()
    files = sorted((shards / "layers").glob("*.safetensors"))
    ahead = [i for i, load in loader._pending.items() if load.exception() is None and load.result().mapped]
    drop_or_skip(files, mapped=[files[i] for i in ahead])


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_reads_from_the_disk_in_parts_at_once(llama, tmp_path, monkeypatch, direct):
    """A layer file read from the disk (the CUDA path; host-tier layers) is read in parts at once, in the loader
    thread and helper threads; the parts cover the file exactly (the output is the loaded model's) and the helpers
    stop with the loader."""
    ckpt, shards, inputs, expected, pad = llama
    shards, seen = _small_parts(monkeypatch, tmp_path, shards)
    model = streamed_model(ckpt, shards, keep_in_page_cache=False, **STREAM_ALL)
    loader = get_streaming_state(model).loader
    loader._map = False  # every read goes through `_read_file` (the CUDA path), not a map
    loader._direct = direct and loader._direct
    _drop_after_enable(loader, shards)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    if direct and not loader._direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert loader.reads["direct" if direct else "page_cache"] > 0
    # every layer was read from the disk in parts (layer 0: its read ahead at enable time was a map); the parts of a
    # file tile it from its first byte read (O_DIRECT: the header too) to its end; helpers read some of them
    for index in range(1, 6):
        path = shards / "layers" / f"{index:05d}.safetensors"
        header = loader.shards.header(layer_unit(index))
        start = 0 if direct else header.data_offset
        parts = sorted({(lo, hi) for name, lo, hi, _ in seen if name == path.name} - {(start, header.file_size)})
        assert len(parts) > 1, f"layer {index} was not read in parts"
        assert parts[0][0] == start and parts[-1][1] == header.file_size == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert any(t.startswith("hf_layerstream-loader-read") for _, _, _, t in seen)
    helpers = list(loader._helpers._threads)
    assert helpers
    disable_layer_streaming(model)
    assert not [t for t in helpers if t.is_alive()]


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_a_failed_part_names_the_layer_and_waits_for_the_others(llama, tmp_path, monkeypatch, direct):
    """A part failing in a helper thread surfaces in the caller naming the layer, once the other parts are done (none
    still writes into the buffer given back); the next call reads the layer again and gives the exact output. An I/O
    error in an O_DIRECT read is not taken for a file system refusing O_DIRECT."""
    from hf_layerstream import engine

    ckpt, shards, inputs, expected, pad = llama
    shards, seen = _small_parts(monkeypatch, tmp_path, shards)
    model = streamed_model(ckpt, shards, keep_in_page_cache=False, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader._map = False
    loader._direct = direct and loader._direct
    if direct and not loader._direct:
        pytest.skip("this file system refuses O_DIRECT")
    _drop_after_enable(loader, shards)
    recording = engine._read_part
    failures = {"left": 2}  # the read ahead and its retry
    running = []

    def flaky(fd, view, lo, hi, limit, path, size):
        layer4 = os.path.basename(path) == "00004.safetensors"
        running.append(layer4)
        try:
            if layer4 and lo > 0 and hi == size and failures["left"]:  # the last part (a helper's): once per read
                failures["left"] -= 1
                raise OSError(5, "Input/output error")
            return recording(fd, view, lo, hi, limit, path, size)
        finally:
            running.remove(layer4)

    monkeypatch.setattr(engine, "_read_part", flaky)
    with pytest.raises(LayerLoadError, match=r"decoder layer 4 .*Input/output error"):
        model.generate(**inputs, **GEN, pad_token_id=pad)
    assert True not in running  # no part of layer 4's failed read still running (others are read ahead)
    assert failures["left"] == 0 and any(name == "00004.safetensors" and lo > 0 for name, lo, _, _ in seen)
    assert loader._direct == direct
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    _assert_every_buffer_accounted_for(loader)
    disable_layer_streaming(model)


def _resident_bytes(address: int, length: int, field: str = "Rss") -> int:
    """This process's resident bytes in the mappings that overlap `[address, address + length)` (`/proc/self/smaps`;
    `field="Anonymous"`: those of them in anonymous memory, copies of the file's pages)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode path"
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < address + length and address < end
            elif head == f"{field}:" and inside:
                total += int(line.split()[1]) * 1024
    return total


def test_an_older_kernel_maps_streamed_layers_over_the_page_cache(llama, monkeypatch):
    """Before Linux 5.14 (no `MADV_POPULATE_READ`: the kernel refuses the advice) a streamed layer is populated at
    mmap time. `MAP_POPULATE` on a writable private map pre-faults it for writing, which copied every page into
    anonymous memory at every use (5x the time per token on the bench model, the layers in flight held twice);
    mapped read-only, populated, then made writable, its pages are the page cache's: resident, none anonymous. A
    weight written in place by a hook copies the page it touches (no `SIGSEGV`), and the output stays exact."""
    from hf_layerstream import _safetensors

    if not os.path.exists("/proc/self/smaps") or _safetensors._libc() is None:
        pytest.skip("needs /proc/self/smaps and libc")
    monkeypatch.setattr(_safetensors, "_MADV_POPULATE_READ", 9999)  # (an advice the kernel does not know: EINVAL)
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    seen = []

    def look(module, args):
        weight = module.down_proj.weight
        size = weight.numel() * weight.element_size()
        seen.append((_resident_bytes(weight.data_ptr(), size), _resident_bytes(weight.data_ptr(), size, "Anonymous")))
        weight.mul_(1)  # (the same values, written in place)

    handle = model.model.layers[3].mlp.register_forward_pre_hook(look)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    handle.remove()
    assert not loader._populate and loader.reads["mapped"] > 0
    assert seen and all(rss > 0 for rss, _ in seen), seen
    assert all(anon == 0 for _, anon in seen), seen
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("in_place", [False, True], ids=["read_ahead", "in_place"])
def test_streamed_layer_maps_are_kept_with_their_pages_released(llama, tmp_path, monkeypatch, in_place):
    """CPU: a streamed layer's file is mapped once and that map is used again at every sweep (no mmap, views or new
    page tables per use); between uses its pages leave the resident set (`MADV_DONTNEED`), so only the layers in use
    or read ahead are resident (none read ahead where warm layers are mapped in place); after
    `disable_layer_streaming` no map of a layer file is left."""
    from hf_layerstream import engine
    from hf_layerstream._safetensors import can_release_mapped_pages

    if not can_release_mapped_pages():
        pytest.skip("no madvise(MADV_DONTNEED) here: maps live as long as their views")
    monkeypatch.setattr(engine, "_read_from_disk", lambda before, after, size: False)  # every map finds them warm
    ckpt, shards, inputs, expected, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, **STREAM_ALL)  # prefetch 1
    loader = get_streaming_state(model).loader
    loader._in_place = in_place
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()
    maps = {i: kept.mm for i, kept in loader._maps.items()}
    assert sorted(maps) == list(range(6))
    sizes = [len(maps[i]) for i in range(6)]
    resident = [_resident_bytes(loader._maps[i].address, sizes[i]) for i in range(6)]
    # every layer's pages were released after use; read ahead, the next sweep's first layer is populated already
    if in_place:
        assert resident == [0] * 6, resident
    else:
        assert resident[0] >= sizes[0] - 4096, resident
        assert resident[1:] == [0] * 5, resident
    mapped = loader.reads["mapped"]
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    loader.wait_idle()  # the read-ahead for the next sweep is counted once it completes (`mapped` included the last)
    assert loader.reads["mapped"] >= mapped + 4 * 6
    assert all(loader._maps[i].mm is maps[i] for i in range(6)), "a kept map was replaced"
    del maps
    disable_layer_streaming(model)
    gc.collect()
    with open("/proc/self/maps") as f:
        assert str(shards / "layers") not in f.read()


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0)], ids=["cpu", "cpu:0", "device-cpu-0"])
def test_cpu_with_an_index_streams_zero_copy_as_cpu_does(llama, device):
    """`device="cpu:0"` is the CPU: streamed layers compute on their file maps in place, as with "cpu". (It differs
    from `torch.device("cpu")`, the device of every CPU tensor, so each `tensor.to(device)` copied: every streamed
    layer was copied out of its map at every use, its map's pages and the copy both resident.)"""
    from conftest import build_meta_model
    from transformers import AutoConfig

    ckpt, shards, inputs, expected, pad = llama
    model = enable_layer_streaming(
        build_meta_model(AutoConfig.from_pretrained(ckpt)), shards, device=device, **STREAM_ALL
    )
    state = get_streaming_state(model)
    loader, where = state.loader, []

    def check(index, module, args):  # a weight in the layer's forward: a view of the layer file's map, not a copy
        kept = loader._maps.get(index)
        ptr = module.weight.data_ptr()
        where.append(kept is not None and kept.address <= ptr < kept.address + len(kept.mm))

    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(functools.partial(check, i))
        for i, layer in enumerate(state.stack.layers)
    ]
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    for handle in handles:
        handle.remove()
    assert len(where) == 6 * GEN["max_new_tokens"] and all(where), where
    assert state.device == torch.device("cpu") and model.device == torch.device("cpu")
    disable_layer_streaming(model)


def test_a_layer_cast_to_the_compute_dtype_holds_only_its_cast(llama, tmp_path):
    """CPU, a float32 shard directory computed in bfloat16: a streamed layer in flight is the bfloat16 copy the loader
    cast, as the plan counts it (`layer_bytes` at the compute dtype); the float32 pages of its file map, read to make
    the copy, leave the resident set once cast, as a quantized layer's packed parts do once decoded. (They stayed
    mapped until the layer's use ended: each layer in flight took its stored bytes on top of the plan's, 3x its
    planned size for a float32 -> bfloat16 cast.)"""
    from hf_layerstream._safetensors import can_release_mapped_pages

    if not can_release_mapped_pages():
        pytest.skip("no madvise(MADV_DONTNEED) here: maps live as long as their views")
    ckpt, shards, inputs, _, pad = llama
    shards = _copy_shards(shards, tmp_path)
    model = streamed_model(ckpt, shards, dtype=torch.bfloat16, **STREAM_ALL)  # prefetch 1
    state = get_streaming_state(model)
    loader, page = state.loader, mmap.PAGESIZE
    assert state.plan.layer_bytes[0] * 2 < state.plan.stored_bytes[0]  # (counted at the compute dtype)
    seen = []

    def check(*_):  # as each layer's forward begins: the layer in use, and the one read ahead by then
        loader.wait_idle()
        for i, kept in list(loader._maps.items()):
            header = kept.header
            # what may stay: the pages not wholly inside a tensor (the header's, those two tensors share)
            inside = 0
            for info in header.tensors.values():
                begin, end = header.data_offset + info.begin, header.data_offset + info.end
                inside += max(end // page - -(-begin // page), 0)
            allowed = (-(-header.file_size // page) - inside) * page
            assert allowed < header.file_size // 2
            seen.append((i, _resident_bytes(kept.address, len(kept.mm)), allowed))

    handles = [layer.register_forward_pre_hook(check) for layer in state.stack.layers]
    expected = _models.load_reference(ckpt, dtype=torch.bfloat16).generate(**inputs, **GEN, pad_token_id=pad)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    for handle in handles:
        handle.remove()
    assert {i for i, _, _ in seen} == set(range(6))
    assert all(resident <= allowed for _, resident, allowed in seen), seen
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


@pytest.mark.parametrize("how", ["cachestat", "mincore"])
def test_cached_fraction_tells_what_is_in_the_page_cache(tmp_path, monkeypatch, how):
    """The page-cache probe of the read path: `cachestat(2)` where the kernel has it (one system call), else
    `mincore` on a throw-away map; both read nothing and tell the same share."""
    from hf_layerstream import _safetensors
    from hf_layerstream._safetensors import cached_fraction

    if how == "mincore":
        monkeypatch.setattr(_safetensors, "_CACHESTAT", False)
    elif not _safetensors._CACHESTAT:
        pytest.skip("no cachestat on this platform")
    path = tmp_path / "layer"
    size = 8 * 2**20 + 1234  # not a whole number of pages
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        first = cached_fraction(fd, size)
        if first is None:
            pytest.skip(f"{how} cannot tell here")
        if how == "cachestat" and _safetensors._CACHESTAT is False:
            pytest.skip("the kernel refused cachestat (before Linux 6.5, or a sandbox)")
        assert first == 1.0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached_fraction(fd, size) != 0.0:
            pytest.skip("this file system keeps dropped files in the page cache")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past what is read
        os.pread(fd, 2 * 2**20, 0)
        assert 0.2 <= cached_fraction(fd, size) <= 0.3  # 2 of 8 MiB (and no more than the range asked for)
        assert cached_fraction(fd, 0) == 1.0
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EIO, errno.EINVAL], ids=["ENOMEM", "EIO", "EINVAL"])
def test_populate_tells_memory_from_a_bad_file(llama, monkeypatch, err):
    """`MADV_POPULATE_READ` failing for want of memory (`ENOMEM`: a cgroup at its limit) raises `MemoryError`,
    without the advice to re-create the shard directory an unreadable file gets (`EIO`: `ShardFileError`); `EINVAL`
    is a kernel without it (`False`: populated at mmap time instead). Streaming, the caller gets the error naming the
    layer, and once memory is back the next call is exact."""
    from hf_layerstream import _safetensors
    from hf_layerstream._safetensors import map_readonly, populate
    from hf_layerstream.errors import ShardFileError

    ckpt, shards, inputs, expected, pad = llama
    path = next(iter(sorted((shards / "layers").glob("*.safetensors"))))
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    if not loader._populate:
        pytest.skip("this kernel has no MADV_POPULATE_READ")

    def refuse(mm, advice, address=None):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(_safetensors, "madvise_released", refuse)
    mm = map_readonly(path, os.path.getsize(path))
    try:
        if err == errno.EINVAL:
            assert populate(mm, path) is False
        else:
            kind = MemoryError if err == errno.ENOMEM else ShardFileError
            with pytest.raises(kind) as raised:
                populate(mm, path)
            assert str(path) in str(raised.value) and os.strerror(err) in str(raised.value)
            assert ("Re-create the shard directory" in str(raised.value)) == (kind is ShardFileError)
    finally:
        mm.close()
    if err == errno.ENOMEM:
        with pytest.raises(LayerLoadError, match=r"decoder layer \d+ .*MemoryError: Out of memory reading"):
            model.generate(**inputs, **GEN, pad_token_id=pad)
        monkeypatch.undo()
        assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_populate_lets_other_threads_run(tmp_path):
    """Reading a layer in (`MADV_POPULATE_READ` of a file not in the page cache) takes tens of milliseconds; the
    loader thread must not hold the GIL meanwhile, or the compute thread's Python stalls for the whole read (as it
    did through `mmap.madvise`)."""
    import time

    from hf_layerstream._safetensors import map_readonly, populate

    path = tmp_path / "layer"
    path.write_bytes(os.urandom(64 * 2**20))
    drop_from_page_cache([path])
    mm = map_readonly(path, os.path.getsize(path))
    took = []

    def read_in():
        t0 = time.perf_counter()
        populate(mm, path)
        took.append(time.perf_counter() - t0)

    reader = threading.Thread(target=read_in)
    gaps = []
    last = time.perf_counter()
    reader.start()
    while reader.is_alive():  # the longest this thread went without running Python while the read was going on
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    reader.join()
    mm.close()
    if took[0] < 0.02:
        pytest.skip(f"the read took {took[0] * 1e3:.1f} ms: too quick to tell (page cache not dropped, fast disk)")
    assert max(gaps) < 0.5 * took[0], (max(gaps), took[0])


def test_released_pages_leave_the_resident_set_not_the_data(tmp_path):
    """A packed weight, once decoded, is unmapped from the process (`release_mapped_pages`): the resident set
    shrinks by its size, and the bytes still read back right (from the page cache)."""
    from hf_layerstream._measure import _status_bytes
    from hf_layerstream._safetensors import map_readonly, populate, release_mapped_pages

    data = os.urandom(32 * 2**20)
    path = tmp_path / "packed"
    path.write_bytes(data)
    mm = map_readonly(path, len(data))
    if not populate(mm, path) or not _status_bytes("RssFile"):
        mm.close()
        pytest.skip("needs MADV_POPULATE_READ and /proc/self/status")
    view = torch.frombuffer(mm, dtype=torch.uint8)
    before = _status_bytes("RssFile")
    release_mapped_pages(view[1000:])  # all but the first page (partly outside the range)
    after = _status_bytes("RssFile")
    assert before - after >= len(data) - 3 * 2**20  # allowing for other files the process maps meanwhile
    assert bytes(view[-4096:].numpy()) == data[-4096:] and bytes(view[:4096].numpy()) == data[:4096]
    del view
    mm.close()


def test_thread_cpu_time_is_exact():
    """The small-folio check compares CPU times of a fraction of a millisecond: the clock must resolve them (the
    user/system split of `getrusage` moved in 4 ms ticks here, so a 0.1 ms call read 0 or 4 ms)."""
    import time

    from hf_layerstream._safetensors import thread_usage

    if thread_usage() is None:
        pytest.skip("no per-thread accounting on this platform")
    for _ in range(5):
        before = thread_usage()
        start = time.perf_counter()
        while time.perf_counter() - start < 2e-4:  # 0.2 ms of CPU
            pass
        spent = thread_usage()[0] - before[0]
        assert 0 < spent < 2e-3, spent


def test_reading_a_header_leaves_the_data_to_huge_page_reads(tmp_path):
    """Reading a layer's header must not start read-ahead into its data: read-ahead continuing from small pages
    brought whole files in as small folios (2 ms instead of 0.2 ms to map an 86 MB layer at every sweep). Nor may
    it drop anything of a file already cached in 2 MiB folios."""
    from safetensors.torch import save_file

    from hf_layerstream._safetensors import cached_fraction, huge_pages_enabled, read_header
    from hf_layerstream.engine import _SMALL_PAGES_CPU_PER_MIB

    path = tmp_path / "layer.safetensors"
    save_file({"w": torch.randn(4 * 2**20)}, str(path))  # 16 MiB of data
    size = os.path.getsize(path)

    def fraction() -> float | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            return cached_fraction(fd, size)
        finally:
            os.close(fd)

    drop_from_page_cache([path])
    if fraction() is None or fraction() > 0:
        pytest.skip("files cannot be dropped from the page cache here (or mincore is not available)")
    header = read_header(path)
    assert header.tensors["w"].shape == (4 * 2**20,)
    assert fraction() == 0  # nothing of a cold file left behind: its data will come in through the huge-page map
    if not huge_pages_enabled():
        return
    map_cpu_per_mib(path)  # read from the disk in 2 MiB folios (where the file system has them)
    if min(map_cpu_per_mib(path) for _ in range(3)) > _SMALL_PAGES_CPU_PER_MIB:
        return  # no large folios here: nothing more to keep
    read_header(path)
    assert fraction() == 1.0  # a warm file stays whole
    assert min(map_cpu_per_mib(path) for _ in range(3)) < _SMALL_PAGES_CPU_PER_MIB


def test_layers_cached_in_small_pages_are_read_again(tmp_path):
    """A warm page cache in small folios (as `read()`/`cp` leave it) makes every remap cost CPU: the loader notices
    (CPU time of mapping, nothing read from disk) and drops such a layer after use, so the next read brings it back
    through the huge-page map; a bounded number of times per layer; the output stays exact throughout."""
    from hf_layerstream import split_checkpoint
    from hf_layerstream._measure import disk_read_bytes
    from hf_layerstream._safetensors import huge_pages_enabled, thread_usage
    from hf_layerstream.demo import write_demo_checkpoint
    from hf_layerstream.engine import _MAX_REPAIRS, _REPAIR_MIN_BYTES, _SMALL_PAGES_CPU_PER_MIB, _evict

    if not huge_pages_enabled() or thread_usage() is None:
        pytest.skip("needs transparent huge pages and per-thread CPU and I/O accounting (Linux)")
    # the mechanism: a file dropped whole and read again through a huge-page map maps cheaply (2 MiB folios); where
    # the file system has no large folios there is nothing to gain, and the loader's repairs stay bounded
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(16 * 2**20))
    read_in_big_chunks(probe)
    assert map_cpu_per_mib(probe) > _SMALL_PAGES_CPU_PER_MIB  # small folios: the cost the loader looks for
    _evict(probe, whole=True)
    map_cpu_per_mib(probe)  # read from the disk
    if min(map_cpu_per_mib(probe) for _ in range(3)) > _SMALL_PAGES_CPU_PER_MIB:
        pytest.skip("this file system does not keep files in 2 MiB page-cache folios")

    # layers of about 45 MB, as real ones are (tens to hundreds of MB)
    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=2, hidden_size=1024, intermediate_size=2816, vocab_size=1000, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    files = sorted((shards / "layers").glob("*.safetensors"))
    assert all(p.stat().st_size >= _REPAIR_MIN_BYTES for p in files)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    expected = _models.load_reference(ckpt).generate(ids, **GEN, pad_token_id=0)

    for p in files:  # before streaming starts: it reads the first layer ahead at once
        read_in_big_chunks(p)
        assert map_cpu_per_mib(p) > _SMALL_PAGES_CPU_PER_MIB  # the set-up really left small folios
    read0 = disk_read_bytes()
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    loader = get_streaming_state(model).loader
    assert torch.equal(model.generate(ids, **GEN, pad_token_id=0), expected)
    assert set(loader.repairs) == {0, 1}, "layers in small pages were not noticed"
    assert torch.equal(model.generate(ids, **GEN, pad_token_id=0), expected)
    loader.wait_idle()
    # both were dropped and read from the disk again (they were all in the page cache before)
    assert disk_read_bytes() - read0 >= sum(p.stat().st_size for p in files)
    for _ in range(4):
        assert torch.equal(model.generate(ids, **GEN, pad_token_id=0), expected)
    assert all(1 <= n <= _MAX_REPAIRS for n in loader.repairs.values())
    disable_layer_streaming(model)


# --- profile --------------------------------------------------------------------------------------------------------


def test_profile_records_every_layer(llama):
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, profile=True, **STREAM_ALL)
    state = get_streaming_state(model)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    data = state.last_profile
    totals = data["totals"]
    for key in ("wait", "read", "dequantize", "copy", "compute", "bytes_read", "wall", "forward_calls"):
        assert key in totals
    assert totals["forward_calls"] == GEN["max_new_tokens"]  # one sweep per token with the KV cache
    assert sorted(data["layers"]) == list(range(6))
    m = ShardDirectory(shards)
    for i, t in data["layers"].items():
        assert t["calls"] == totals["forward_calls"]
        assert t["compute"] > 0 and t["read"] > 0 and t["wait"] >= 0
        # every use's read, those read ahead before the call began too (layer 0's at enable time)
        assert t["bytes_read"] == m.header(f"layers.{i}").data_size * totals["forward_calls"]
    assert 0 < totals["compute"] <= totals["wall"]
    assert totals["wait"] <= totals["wall"]
    summary = state.profile.summary()
    for word in ("compute", "wait", "read", "dequant", "copy"):
        assert word in summary
    # a second call starts from zero, and has the reads of the layers it used (read ahead at the end of the first)
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=pad)
    assert state.last_profile["totals"]["forward_calls"] == 2
    for i, t in state.last_profile["layers"].items():
        assert t["calls"] == 2 and t["bytes_read"] == m.header(f"layers.{i}").data_size * 2
    disable_layer_streaming(model)


def test_the_profiles_wall_time_is_the_generate_calls_not_the_time_since(llama):
    """`state.profile.summary()` after a `generate` call (as `budget_and_profile.py` prints it) is that call's profile:
    its wall time ran on to the moment it was printed (a 0.3 s call printed 1.5 s later said "wall 1.8 s"). It stops
    as the call ends; a pass run after it (outside any `generate`) adds to the profile and starts it again."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, profile=True, **STREAM_ALL)
    state = get_streaming_state(model)
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    wall = state.last_profile["totals"]["wall"]
    time.sleep(0.5)
    assert state.profile.totals()["wall"] == wall
    assert f"wall {wall:.3f} s" in state.profile.summary()
    with torch.no_grad():
        model(**inputs)  # (a pass of its own: part of the profile since the call began, as its forward_calls are)
    totals = state.profile.totals()
    assert totals["forward_calls"] == GEN["max_new_tokens"] + 1 and totals["wall"] >= wall + 0.5
    model.generate(**inputs, **GEN, pad_token_id=pad)
    assert state.profile.totals()["wall"] == state.last_profile["totals"]["wall"]  # (restarted, and stopped again)
    disable_layer_streaming(model)


def test_the_profile_of_an_early_exit_call_covers_the_whole_call(llama):
    """`assistant_early_exit`: transformers drafts with the model's own `generate`, called inside the outer call; those
    calls restarted the profile, which then held only the tail of the call (3 of 29 passes). The draft's passes
    through the first layers are part of the call's profile, and the last layer runs once per full pass."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, profile=True, **STREAM_ALL)
    state = get_streaming_state(model)
    layers = state.stack.layers
    passes = {0: 0, 5: 0}
    handles = [
        layers[i].register_forward_pre_hook(lambda m, a, i=i: passes.__setitem__(i, passes[i] + 1)) for i in passes
    ]
    kw = {**GEN, "pad_token_id": pad, "assistant_early_exit": 2}
    assert torch.equal(model.generate(**inputs, **kw), expected)
    for handle in handles:
        handle.remove()
    data = state.last_profile
    assert passes[0] > passes[5]  # (draft passes, and full ones)
    assert data["totals"]["forward_calls"] == passes[0]
    assert data["layers"][0]["calls"] == passes[0] and data["layers"][5]["calls"] == passes[5]
    disable_layer_streaming(model)


def test_generate_calls_at_once_from_two_threads_each_get_their_own_profile(llama):
    """Two `generate` calls at once (a server's worker threads) shared one profile, which each reset as it began: each
    call's `last_profile` mixed both (a 5-token call reported 12 passes). Each call now has its own, the passes its
    thread ran and the loader's times of the layers they used; `state.profile` covers the calls under way together."""
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards, profile=True, **STREAM_ALL)
    state = get_streaming_state(model)
    tokens = {"first": 5, "second": 7}
    second_began = threading.Event()
    # the second call begins while the first is inside its first pass (passes run one at a time: it waits for it)
    prepare = model.prepare_inputs_for_generation

    def prepare_inputs(*args, **kwargs):
        if threading.current_thread().name == "second":
            second_began.set()
        return prepare(*args, **kwargs)

    def hold_first_pass(module, args):
        if threading.current_thread().name == "first":
            assert second_began.wait(30)

    model.prepare_inputs_for_generation = prepare_inputs
    handle = model.model.embed_tokens.register_forward_pre_hook(hold_first_pass)
    profiles, errors = {}, []

    def call(name):
        try:
            n = tokens[name]
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
            profiles[name] = state.last_profile
        except BaseException as e:  # (reported below, with its traceback)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(name,), name=name) for name in tokens]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for t in threads:
        t.join(120)
    handle.remove()
    del model.prepare_inputs_for_generation
    if errors:
        raise errors[0]
    m = ShardDirectory(shards)
    for name, n in tokens.items():
        data = profiles[name]
        assert data["totals"]["forward_calls"] == n, (name, data["totals"])
        assert sorted(data["layers"]) == list(range(6))
        for i, t in data["layers"].items():
            assert t["calls"] == n and t["bytes_read"] == m.header(f"layers.{i}").data_size * n
        assert 0 < data["totals"]["compute"] <= data["totals"]["wall"]
    assert state.profile.totals()["forward_calls"] == sum(tokens.values())  # (both calls, since the first began)
    # a call alone afterwards: its own again, and the model's profile restarts with it
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=pad)
    assert state.last_profile["totals"]["forward_calls"] == state.profile.totals()["forward_calls"] == 2
    disable_layer_streaming(model)


# --- peak memory ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [2, None], ids=["prefetch2", "default"])
def test_peak_rss_is_resident_plus_a_few_layers(tmp_path, prefetch):
    """24 layers streamed from disk: the child's VmHWM grows by the resident parts and ~(prefetch + 1) layers only,
    also with the default prefetch (3 on CPU with full-precision shards)."""
    from hf_layerstream import split_checkpoint
    from hf_layerstream._measure import run_child
    from hf_layerstream.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(
        tmp_path / "ckpt", layers=24, hidden_size=384, intermediate_size=1024, vocab_size=1000, dtype="float32"
    )
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    m = ShardDirectory(shards)
    layer = m.unit("layers.0").logical_nbytes
    resident = m.unit("resident").logical_nbytes
    model_bytes = resident + 24 * layer
    common = {"input_ids": list(range(5, 21)), "max_new_tokens": 3, "pad_token_id": 0}
    specs = [
        {"system": "streamed", "path": str(shards), "max_memory": {"cpu": 0}, "prefetch": prefetch, **common},
        {"system": "in_memory", "path": str(ckpt), **common},
    ]
    with ThreadPoolExecutor(2) as pool:  # two child processes side by side: each reads its own VmHWM
        streamed, full = pool.map(run_child, specs)
    assert streamed["tokens"] == full["tokens"]
    # (library code the pass paged in is not held: see `_measure.library_rss`)
    grown = streamed["peak_rss"] - streamed["baseline_rss"] - streamed["library_rss_growth"]
    k = 3 if prefetch is None else prefetch
    assert streamed["plan_data"]["prefetch"] == k
    allowed = 1.15 * (resident + (k + 1) * layer) + 32 * 2**20  # + activations, allocator slack
    assert grown <= allowed, f"streamed grew {grown / 2**20:.0f} MiB, allowed {allowed / 2**20:.0f} MiB"
    full_grown = full["peak_rss"] - full["baseline_rss"]
    assert full_grown >= 0.9 * model_bytes
    assert grown < 0.4 * full_grown


# --- CUDA -----------------------------------------------------------------------------------------------------------


def _mixed_budget(shards, prefetch: int, on_device: int = 2, in_host: int = 2) -> dict:
    """A CUDA `max_memory` whose plan keeps `on_device` layers on GPU 0, `in_host` in pinned host RAM and streams
    the rest from the disk (fp32 shards: stored sizes are the computed ones). The host budget holds `in_host` layers
    and the `prefetch + 1` staging buffers of the layers read from the disk: so for a mixed plan more than
    `prefetch + 1` layers must be left to the disk (else keeping them all in host RAM costs no more)."""
    m = ShardDirectory(shards)
    layer = max(m.unit(layer_unit(i)).size for i in range(m.num_layers))
    resident = m.unit("resident").logical_nbytes
    # the plan keeps room for `prefetch + 1` layers in flight, and a tenth of the device budget for activations
    device = resident + (prefetch + 1 + on_device) * layer + layer // 2
    return {0: device * 10 // 9 + 10, "cpu": (prefetch + 1 + in_host) * layer + layer // 2}


def test_mixed_cuda_budget_gives_every_tier(checkpoints):
    """The budget the CUDA tests use for a mixed plan does give one (checked here, where no GPU is needed)."""
    _, shards = checkpoints("llama", num_hidden_layers=8)
    plan = plan_residency(
        ShardDirectory(shards), torch.device("cuda", 0), max_memory=_mixed_budget(shards, 2), prefetch=2
    )
    assert (len(plan.device_layers), len(plan.host_layers), len(plan.streamed)) == (2, 2, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("profile", [False, True], ids=["overlapped", "profiled"])  # profiling syncs every layer
@pytest.mark.parametrize(
    "options",
    [{"max_memory": {0: 0, "cpu": 0}}, {"max_memory": {0: "1GiB", "cpu": 0}}, {"max_memory": {0: 0}}, {}, "mixed"],
)
def test_cuda_streaming_exact_and_buffers_reused(checkpoints, options, profile):
    from conftest import build_meta_model
    from transformers import AutoConfig

    mixed = options == "mixed"  # two layers on the GPU, two in pinned host RAM, four streamed from the disk
    ckpt, shards = checkpoints("llama", num_hidden_layers=8 if mixed else 6)
    ref = _models.load_reference(ckpt).to("cuda")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt").to("cuda")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    if mixed:
        options = {"max_memory": _mixed_budget(shards, 2)}
    enable_layer_streaming(model, shards, device="cuda", prefetch=2, profile=profile, **options)
    state = get_streaming_state(model)
    if mixed:
        assert (len(state.plan.device_layers), len(state.plan.host_layers), len(state.plan.streamed)) == (2, 2, 4)
    # host-tier layers count as CPU offload, streamed ones as disk offload: either keeps generate from compiling
    prefix = state.stack.prefix
    assert all(model.hf_device_map[f"{prefix}.{i}"] == "cpu" for i in state.plan.host_layers)
    assert all(model.hf_device_map[f"{prefix}.{i}"] == "disk" for i in state.plan.streamed)
    kw = {**GEN, "pad_token_id": tok.pad_token_id}
    assert torch.equal(model.generate(**inputs, **kw), ref.generate(**inputs, **kw))
    loader = state.loader
    loader.wait_idle()
    assert loader._pool.allocated <= min(loader.prefetch + 1, len(state.plan.streamed))  # (as the plan counts)
    assert all(buf.is_pinned() and buf.data_ptr() % 4096 == 0 for buf, _ in loader._pool._free)
    # pinned at the largest streamed layer file's (page-rounded) size, not at the caching host allocator's powers of 2
    size = _round_up(max((loader.shards.header(layer_unit(i)).file_size for i in state.plan.streamed), default=0))
    staging = [buf for buf, _ in loader._pool._free]
    assert all(buf.numel() == size for buf in staging)
    assert bool(staging) == bool(state.plan.streamed)
    if loader._pinned._registering:  # (where the driver refuses, torch's pinned allocator is used instead)
        assert set(loader._pinned._held) >= {buf.data_ptr() for buf in staging}
        assert len(loader._pinned._held) == loader._pool.allocated + len(state.plan.host_layers)
    if profile and (state.plan.streamed or state.plan.host_layers):
        assert state.last_profile["totals"]["copy"] > 0
    disable_layer_streaming(model)
    assert not _loader_threads(loader)
    assert not loader._pinned._held  # unregistered


@pytest.mark.cuda
def test_cuda_kept_layers_hold_their_weights_on_a_mixed_plan(checkpoints):
    """On the GPU, in a plan that keeps two layers there, two in pinned host RAM and streams four from the disk: the
    kept layers hold their weights between passes (the host and disk ones do not), the passes stay exact, a
    same-dtype `model.to(...)` takes the held weights out through the guards and the layers hold again after the next
    pass, a pass with gradients takes them out and gives the loaded model's input gradient, and
    `disable_layer_streaming` leaves no layer's weights allocated on the GPU."""
    from conftest import build_meta_model
    from transformers import AutoConfig

    ckpt, shards = checkpoints("llama", num_hidden_layers=8)
    ref = _models.load_reference(ckpt).to("cuda")
    ids = torch.tensor([[1, 5, 7, 9, 11]], device="cuda")
    with torch.no_grad():
        want = ref(ids).logits
    embeds = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
    ref(inputs_embeds=embeds).logits.pow(2).mean().backward()
    ref.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    enable_layer_streaming(model, shards, device="cuda", max_memory=_mixed_budget(shards, 2), prefetch=2)
    state = get_streaming_state(model)
    kept, others = state.plan.device_layers, state.plan.host_layers + state.plan.streamed
    assert len(kept) == 2 and len(others) == 6
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, want)
    assert all(state.hooks[i]._installed for i in kept) and not any(state.hooks[i]._installed for i in others)
    assert all(not w.is_meta and w.is_cuda for i in kept for w in _held(model, i).values())
    model.to("cuda", torch.float32)  # the device and dtype it streams to: allowed, the held weights out first
    assert not any(state.hooks[i]._installed for i in kept)
    assert all(w.is_meta for i in kept for w in _held(model, i).values())
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).logits, want)
    assert all(state.hooks[i]._installed for i in kept)
    streamed_embeds = embeds.detach().requires_grad_(True)
    model(inputs_embeds=streamed_embeds).logits.pow(2).mean().backward()
    assert torch.equal(streamed_embeds.grad, embeds.grad)
    assert not any(state.hooks[i]._installed for i in kept)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert all(state.hooks[i]._installed for i in kept)
    disable_layer_streaming(model)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base < min(state.plan.layer_bytes)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [1, 3])
def test_cuda_pass_interrupted_inside_a_layer_leaves_nothing_behind(checkpoints, prefetch):
    """As on CPU: after a pass interrupted inside a layer, the next call is exact, one layer at a time is in use,
    and no more than (prefetch + 1) streamed layers are held (on a GPU, the stale read-ahead layers on top of the new
    pass's ones would be device memory past the plan)."""
    from conftest import build_meta_model
    from transformers import AutoConfig

    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    ref = _models.load_reference(ckpt).to("cuda")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt").to("cuda")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    enable_layer_streaming(model, shards, device="cuda", max_memory={0: 0, "cpu": 0}, prefetch=prefetch)
    out, held = _interrupt_then_generate(model, inputs, tok.pad_token_id)
    assert torch.equal(out, ref.generate(**inputs, **GEN, pad_token_id=tok.pad_token_id))
    assert max(held) <= prefetch + 1, held
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    assert loader._pool.allocated <= prefetch + 1
    disable_layer_streaming(model)


@pytest.mark.cuda
@pytest.mark.parametrize("lagging", ["copy", "compute"])
def test_cuda_output_exact_when_one_stream_lags_far_behind(checkpoints, monkeypatch, lagging):
    """Stream ordering, made visible: the copy stream held back before each layer's copies (the compute must wait
    for each layer's event, or it reads memory not written yet), or the compute stream held back after each layer
    (the loader runs ahead: a layer's device memory or a staging buffer reused before the GPU is done with it would
    change what a queued kernel reads). The output stays exact, and the buffers bounded."""
    from conftest import build_meta_model
    from transformers import AutoConfig

    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    ref = _models.load_reference(ckpt).to("cuda")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt").to("cuda")
    kw = {**GEN, "pad_token_id": tok.pad_token_id}
    expected = ref.generate(**inputs, **kw)
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    enable_layer_streaming(model, shards, device="cuda", prefetch=2, max_memory={0: 0, "cpu": 0})
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    cycles = 20_000_000  # about 10 ms of a GPU's clock: far longer than a tiny layer's copy or compute
    if lagging == "copy":
        real_finish = loader._finish

        def finish(*args, **kwargs):  # in `_load_streamed` the current stream is the copy stream
            torch.cuda._sleep(cycles)
            return real_finish(*args, **kwargs)

        monkeypatch.setattr(loader, "_finish", finish)
    else:
        real_release = loader.release

        # (the hooks call it with the layer's `graph` flag too: `release(index, graph)`)
        def release(index, graph=False):  # on the compute stream, after the layer's kernels, before its release
            torch.cuda._sleep(cycles)
            real_release(index, graph)

        monkeypatch.setattr(loader, "release", release)
    for _ in range(2):
        assert torch.equal(model.generate(**inputs, **kw), expected)
    loader.wait_idle()
    assert loader._pool.allocated <= loader.prefetch + 1
    disable_layer_streaming(model)


@pytest.mark.cuda
def test_cuda_memory_stays_within_the_plan_across_sweeps(tmp_path):
    """Every layer streamed from the disk, layers large enough for the caching allocator's large pool: the device
    memory allocated while generating peaks at (prefetch + 1) layers over the resident parts (plus a few MiB of KV
    cache and activations), and what the allocator reserves stops growing after the first sweeps (the loader waits
    for the GPU to pass each released layer before it copies the next, so freed layers are reused, not added to)."""
    from conftest import build_meta_model
    from transformers.generation.streamers import BaseStreamer

    from hf_layerstream import split_checkpoint

    config = _models.make_config("llama", 6, hidden_size=512, intermediate_size=1408, vocab_size=1024)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    model = build_meta_model(config)
    prefetch = 2
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # before the resident parts and the layers read ahead at enable time
    enable_layer_streaming(model, shards, device="cuda", prefetch=prefetch, max_memory={0: 0, "cpu": 0})
    state = get_streaming_state(model)
    layer, resident = max(state.plan.layer_bytes), state.plan.resident_bytes
    assert layer > 8 * 2**20  # (its MLP weights are each over the small pool's 1 MiB)
    ids = torch.randint(5, 1000, (1, 12), generator=torch.Generator().manual_seed(0)).to("cuda")
    state.loader.wait_idle()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reserved = []

    class AfterEachSweep(BaseStreamer):  # `put` comes once per forward pass (the prompt's ids first, before any)
        def put(self, value):
            torch.cuda.synchronize()
            reserved.append(torch.cuda.memory_stats()["reserved_bytes.large_pool.current"])

        def end(self):
            pass

    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    out = model.generate(ids, streamer=AfterEachSweep(), **kw)
    state.loader.wait_idle()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert resident + layer <= peak <= resident + (prefetch + 1) * layer + 16 * 2**20, (peak / 2**20, layer / 2**20)
    assert len(reserved) == 11 and reserved[3:] == [reserved[3]] * 8, [r / 2**20 for r in reserved]
    disable_layer_streaming(model)
    ref = _models.load_reference(ckpt).to("cuda")
    assert torch.equal(out, ref.generate(ids, **kw))


class _FakeEvent:
    """A CUDA event stand-in: done or not, and whether anybody waited for it."""

    def __init__(self, done: bool):
        self.done = done
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_staging_pool_prefers_idle_buffers_and_overlaps_reads_with_copies():
    """CUDA staging: a buffer whose copy is still running is not waited for while another may be allocated (the next
    read from the disk then overlaps that copy); at the limit, the oldest is waited for."""
    from hf_layerstream.engine import _BufferPool

    pool = _BufferPool(None)
    first = pool.take(5000, limit=2)
    busy = _FakeEvent(done=False)
    pool.give(first, [], busy)
    second = pool.take(5000, limit=2)  # the first is still being copied from: a new one
    assert second.data_ptr() != first.data_ptr() and pool.allocated == 2 and not busy.waited
    pool.give(second, [], _FakeEvent(done=True))
    assert pool.take(5000, limit=2).data_ptr() == second.data_ptr()  # the idle one, no wait
    assert not busy.waited
    again = pool.take(5000, limit=2)  # at the limit: the busy one, once its copy is done
    assert again.data_ptr() == first.data_ptr() and busy.waited and pool.allocated == 2
    # no limit (CPU reads, no events): the first that fits, as before
    pool.give(again, [])
    assert pool.take(100).data_ptr() == first.data_ptr() and pool.allocated == 2


def test_a_layer_kept_on_the_gpu_is_loaded_with_its_copies_waited_for(llama, monkeypatch):
    """A kept layer is loaded at its first use, in the compute thread, on the stream current then; like the resident
    parts it waits for its copies there, once, so that a later pass run on another stream finds it whole (a stand-in
    stream on CPU: the GPU's own run is in the `cuda` tests)."""
    ckpt, shards, *_ = llama
    model = streamed_model(ckpt, shards)
    loader = get_streaming_state(model).loader
    kept = [i for i in range(loader.shards.num_layers) if loader.plan.tier(i) == "device"]
    assert kept and kept[0] not in loader._device_cache
    syncs = []

    class Stream:
        def synchronize(self):
            syncs.append(len(loader._device_cache))  # (before the layer is handed out)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(loader, "is_cuda", True)
    first = loader.kept(kept[0])
    assert syncs == [0] and loader.kept(kept[0]) is first and syncs == [0]
    monkeypatch.undo()
    disable_layer_streaming(model)


def test_disabling_hands_the_allocators_caches_back(llama, monkeypatch):
    """On CUDA, `disable_layer_streaming` empties the caching allocators once, at the end: the device blocks the
    freed weights leave cached, and torch's pinned host blocks (used where `cudaHostRegister` failed), which would
    otherwise stay with the process (stand-ins on CPU: the GPU's own run is in the `cuda` tests)."""
    from contextlib import contextmanager

    ckpt, shards, *_ = llama
    model = streamed_model(ckpt, shards)
    loader = get_streaming_state(model).loader
    emptied = []

    @contextmanager
    def device(d):
        emptied.append(("device", d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    # (once the model's weights are gone: meta again, so nothing of them is left in use to stay cached)
    on_meta = lambda: all(p.device.type == "meta" for p in model.parameters())  # noqa: E731
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(("device cache", on_meta())))
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(("host cache", None)), raising=False)
    monkeypatch.setattr(loader, "is_cuda", True)
    disable_layer_streaming(model)
    assert emptied == [("device", loader.device), ("device cache", True), ("host cache", None)]
    monkeypatch.undo()


def test_a_staging_buffer_that_cannot_be_allocated_is_not_counted(monkeypatch):
    """A failed allocation (pinned memory or host RAM exhausted) leaves the pool's count as it was: counted, the pool
    would wait for busy buffers as if at its limit, and hold one buffer fewer than it may."""
    from hf_layerstream import engine

    pool = engine._BufferPool(None)
    pool.give(pool.take(5000, limit=2), [], _FakeEvent(done=False))
    real = engine._aligned_buffer

    def exhausted(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (simulated cudaHostAlloc)")

    monkeypatch.setattr(engine, "_aligned_buffer", exhausted)
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.take(5000, limit=2)
    assert pool.allocated == 1
    monkeypatch.setattr(engine, "_aligned_buffer", real)
    busy = pool._free[0][1]
    assert pool.take(5000, limit=2) is not None and pool.allocated == 2 and not busy.waited  # (a new one: no wait)


class _FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister / cudaGetLastError calls, and the device each (un)registering
    ran under (`device`: set by the `torch.cuda.device` stand-in that `_fake_cuda` installs)."""

    def __init__(self, fail=False):
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.errors_cleared = 0
        self.device = None
        self.devices: list = []  # the device current at each register / unregister call

    def cudaGetLastError(self):  # noqa: N802
        self.errors_cleared += 1
        return 0

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the CUDA runtime's name
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        assert flags == 1 and ptr % 4096 == 0
        self.registered[ptr] = size
        self.devices.append(self.device)
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        assert ptr in self.registered and ptr not in self.unregistered
        # still mapped when unregistered (reading an unmapped address would crash the test run)
        assert ctypes.string_at(ptr, 1) is not None
        self.unregistered.append(ptr)
        self.devices.append(self.device)
        return 0


def _fake_cuda(monkeypatch, fake: _FakeCudart) -> None:
    """`torch.cuda.cudart()` -> `fake`; `torch.cuda.device(d)` sets `fake.device` to `d` for its block."""
    from contextlib import contextmanager

    @contextmanager
    def device(d):
        before, fake.device = fake.device, d
        try:
            yield
        finally:
            fake.device = before

    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "device", device)


def test_pinned_host_buffers_are_exact_size_and_unregistered_before_unmapped(monkeypatch):
    gpu = torch.device("cuda", 1)
    pinned = _PinnedHost(gpu)
    fake = _FakeCudart()
    _fake_cuda(monkeypatch, fake)
    sizes = [_round_up(86_000_123), _round_up(5000), 4096]
    bufs = [pinned.empty(n) for n in sizes]
    # exactly what was asked, page-aligned, registered as such (torch's pinned allocator would round 86 MB to 128)
    assert [b.numel() for b in bufs] == sizes
    assert fake.registered == {b.data_ptr(): n for b, n in zip(bufs, sizes)}
    bufs[0][:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    view = bufs[0][:3]
    maps = [weakref.ref(m) for m in pinned._held.values()]
    del bufs
    assert all(m() is not None for m in maps)  # the registry keeps every map until it is unregistered
    synced = []
    pinned.release(type("Stream", (), {"synchronize": lambda self: synced.append(len(fake.unregistered))})())
    assert synced == [0]  # the copy stream was waited for before anything was unregistered
    assert sorted(fake.unregistered) == sorted(fake.registered) and not pinned._held
    # registered and unregistered under the model's device (the loader thread never set one)
    assert fake.devices == [gpu] * (2 * len(sizes))
    assert view.tolist() == [1, 2, 3]  # a view outliving release reads ordinary (unpinned) memory
    assert sum(m() is not None for m in maps) == 1  # the view's map stays; the others went with the registry
    pinned.release()  # twice: nothing left to unregister
    assert len(fake.unregistered) == len(sizes)
    # one buffer given up early (a host-tier layer whose read failed): unregistered now, the others stay pinned
    # (a fresh registry: the addresses of the maps unmapped above may be handed out again)
    pinned, fake = _PinnedHost(gpu), _FakeCudart()
    _fake_cuda(monkeypatch, fake)
    keep, drop = pinned.empty(4096), pinned.empty(8192)
    pinned.free(drop)
    assert fake.unregistered == [drop.data_ptr()] and set(pinned._held) == {keep.data_ptr()}
    pinned.free(drop)  # twice: nothing more to unregister
    assert fake.unregistered == [drop.data_ptr()]


def test_cuda_error_of_a_failed_registering_is_read_off_by_a_kernel_launch(monkeypatch):
    """torch binds no `cudaGetLastError`: the error a failed `cudaHostRegister` leaves is read off by launching a
    one-element kernel, whose launch check raises it (and that is dropped), under the model's device."""
    from hf_layerstream import engine

    gpu = torch.device("cuda", 1)

    class NoGetLastError(_FakeCudart):  # as torch's `_cudart` is
        cudaGetLastError = None  # noqa: N815

    fake = NoGetLastError(fail=True)
    _fake_cuda(monkeypatch, fake)
    launched = []

    def launch(device):  # as torch raises the pending error after the launch
        launched.append(device)
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(engine, "_launch_one_kernel", launch)
    monkeypatch.setattr(torch, "empty", lambda size, **kw: torch.frombuffer(mmap.mmap(-1, size), dtype=kw["dtype"]))
    pinned = _PinnedHost(gpu)
    assert pinned.empty(4096).numel() == 4096  # (from the fallback allocator; no error escapes)
    assert launched == [gpu] and not pinned._registering
    # a failed unregistering too, under its device
    monkeypatch.setattr(fake, "cudaHostUnregister", lambda ptr: 1)
    engine._unregister(8192, gpu)
    assert launched == [gpu, gpu]
    # anything else than a RuntimeError is not swallowed
    monkeypatch.setattr(engine, "_launch_one_kernel", lambda device: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        engine._clear_cuda_error(gpu)


@pytest.mark.cuda
def test_cuda_error_of_a_failed_registering_does_not_reach_the_next_kernel():
    """A real failed `cudaHostRegister` (the same memory twice) and its error cleared: the next kernel launched in
    this thread runs, rather than raising that error as its own."""
    from hf_layerstream import engine

    buf = torch.frombuffer(mmap.mmap(-1, 4096), dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(buf.data_ptr(), 4096, 1)) == 0
    try:
        assert int(cudart.cudaHostRegister(buf.data_ptr(), 4096, 1)) != 0  # already registered
        engine._clear_cuda_error(torch.device("cuda", torch.cuda.current_device()))
        assert torch.ones(3, device="cuda").add_(1).tolist() == [2.0, 2.0, 2.0]
    finally:
        assert int(cudart.cudaHostUnregister(buf.data_ptr())) == 0


@pytest.mark.cuda
def test_the_loader_sleeps_while_it_waits_for_the_gpu():
    """The events the loader thread waits for are blocking: it sleeps until the GPU reaches them rather than spinning
    on a core (which the reads and the compute thread need)."""
    import time

    from hf_layerstream import engine

    torch.cuda.synchronize()
    torch.cuda._sleep(10**9)  # a billion GPU cycles: about 0.5 s
    event = engine._loader_event()
    event.record()
    wall, cpu = time.perf_counter(), time.thread_time()
    event.synchronize()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert wall > 0.05, wall  # (it did wait)
    assert cpu < 0.5 * wall, (cpu, wall)


def test_the_loader_thread_starts_on_the_models_gpu(monkeypatch):
    """On CUDA the loader thread's current device is the model's from its start, so a call made there without
    naming the device does not reach device 0 (and a CUDA context there). Its executors, made with a CUDA device
    whose `set_device` a stand-in records (the threads are the real ones)."""
    from hf_layerstream.engine import LayerLoader

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((device, threading.get_ident())))
    loader = LayerLoader.__new__(LayerLoader)
    loader.device, loader.is_cuda, loader._map_streams = torch.device("cuda", 1), True, 0
    loader._new_executors()
    try:
        ident = loader._executor.submit(threading.get_ident).result()
    finally:
        loader._executor.shutdown(wait=True)
    assert calls == [(torch.device("cuda", 1), ident)]
    assert ident != threading.get_ident()
    loader.is_cuda, loader.device = False, torch.device("cpu")  # on CPU: nothing set
    loader._new_executors()
    try:
        loader._executor.submit(threading.get_ident).result()
    finally:
        loader._executor.shutdown(wait=True)
    assert len(calls) == 1


def test_pinned_host_falls_back_to_torch_when_registering_fails(monkeypatch):
    pinned = _PinnedHost()
    fake = _FakeCudart(fail=True)
    _fake_cuda(monkeypatch, fake)
    calls = []
    skew = {"bytes": 0}  # where torch's pinned block starts, past a page boundary

    def fake_empty(size, **kwargs):
        assert kwargs["pin_memory"]
        calls.append(size)
        block = torch.frombuffer(mmap.mmap(-1, size + 4096), dtype=kwargs["dtype"])  # page-aligned
        return block[skew["bytes"] : skew["bytes"] + size]

    monkeypatch.setattr(torch, "empty", fake_empty)
    buf = pinned.empty(8192)
    # exactly the size asked for: asking for a page more would double a power-of-two size in torch's allocator
    assert calls == [8192] and buf.numel() == 8192 and buf.data_ptr() % 4096 == 0
    assert not pinned._registering and not pinned._held
    # the failed call's error was read off, so this thread's next kernel launch does not raise it as its own
    assert fake.errors_cleared == 1
    pinned.empty(4096)  # no second attempt at registering
    assert calls == [8192, 4096] and fake.errors_cleared == 1
    # a block that is not page-aligned: a page more, and the aligned part of it (O_DIRECT reads into it)
    skew["bytes"] = 64
    buf = pinned.empty(4096)
    assert calls == [8192, 4096, 4096, 8192] and buf.numel() == 4096 and buf.data_ptr() % 4096 == 0


@pytest.mark.parametrize(
    "compression, options",
    [(None, {"max_memory": {"cpu": 0}, "prefetch": 1}), ("4bit", {"dequantize": "module"})],
    ids=["every layer streamed", "4-bit, decoded by module"],
)
def test_autocast_keeps_no_casts_of_weights_new_at_each_pass(tmp_path, compression, options):
    """Under `torch.autocast` (to bfloat16), torch keeps the cast of every weight it casts until the block ends, for
    its next use: a loaded model's weights are cast once, but a streamed layer's (and a weight decoded module by
    module) are new tensors at every pass, and every pass added a copy of each: three `generate` calls of 4 tokens
    grew the process by 350 MB (every layer streamed, 37 MB of casts per sweep) and 1.3 GB (4-bit), to the block's end.
    Now autocast's cache is off during such passes, and nothing of them is kept; the logits stay the loaded model's
    under the same autocast."""
    if compression is not None:
        pytest.importorskip("bitsandbytes")
    config = _models.make_config(
        "llama", num_hidden_layers=8, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4000,
    )  # fmt: skip
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt")
    shards = split_checkpoint(ckpt, tmp_path / "shards", compression=compression, progress=False)
    model = streamed_model(ckpt, shards, **options)
    casts_per_sweep = sum(2 * p.numel() for p in _models.load_reference(ckpt).model.layers.parameters())
    ids = torch.tensor([[1, 5, 9, 33, 17, 20, 5, 9, 33]])
    grown = anon_growth_under_autocast(model, ids)
    if grown is None:
        pytest.skip("needs /proc/self/status")
    if compression is None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    assert grown < casts_per_sweep, (grown, casts_per_sweep)
    disable_layer_streaming(model)


def test_under_autocast_the_callers_own_weights_keep_their_single_cast(checkpoints):
    """Review: dropping autocast's cache after each streamed layer's pass also dropped the casts of the caller's own
    weights (a P-tuning-style prompt encoder used for two passes in one autocast block): cast twice, their gradients
    were summed in float32 where the loaded model's single cast sums them in bfloat16 (7.6e-6 off). The cache is off
    during such passes instead, and what it holds stays: the encoder's gradients are the loaded model's."""
    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    hidden = ref.config.hidden_size
    torch.manual_seed(0)
    start = torch.nn.Linear(hidden, hidden).state_dict()
    x = torch.randn(2, 6, hidden)

    def run(model):
        encoder = torch.nn.Linear(hidden, hidden)
        encoder.load_state_dict(start)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total = sum(model(inputs_embeds=encoder(x[i : i + 1])).logits.float().pow(2).mean() for i in range(2))
        total.backward()
        return total.detach(), encoder.weight.grad, encoder.bias.grad

    want = run(ref)
    for options in ({}, STREAM_ALL):
        model = streamed_model(ckpt, shards, **options)
        got = run(model)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), options
        assert torch.is_autocast_cache_enabled()  # (on again after the passes)
        disable_layer_streaming(model)


@pytest.mark.parametrize("kernel", ["current", "before_5_14"])
def test_reading_a_kept_layer_ahead_reads_its_file(llama, monkeypatch, kernel):
    """`_warm_file` (a kept layer read ahead of its first use) leaves the whole file in the page cache, also on a
    kernel without `MADV_POPULATE_READ` (before Linux 5.14: the advice refused), where it read nothing before; there
    the advice is asked once, not again for each layer (a map made and refused each time)."""
    from hf_layerstream import _safetensors, engine

    if kernel != "current":
        monkeypatch.setattr(_safetensors, "_MADV_POPULATE_READ", 9999)  # (an advice the kernel does not know)
    asked = []
    real_populate = engine.populate
    monkeypatch.setattr(engine, "populate", lambda *a, **k: asked.append(a[1]) or real_populate(*a, **k))
    ckpt, shards, inputs, expected, pad = llama
    model = streamed_model(ckpt, shards)  # (every layer kept)
    loader = get_streaming_state(model).loader
    paths = [loader.shards.files[layer_unit(i)] for i in (5, 4)]
    drop_from_page_cache(paths)
    if max(map(cached_share, paths)) > 0.5:
        pytest.skip("this file system keeps the file in the page cache")
    for i in (5, 4):
        loader._warm_file(i)
    assert [cached_share(p) for p in paths] == [1.0, 1.0]
    if kernel == "current":
        assert set(paths) <= set(asked)
    else:
        assert len(asked) == 1 and not loader._populate, asked
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    disable_layer_streaming(model)


def test_kept_layers_are_read_into_the_page_cache_ahead_of_their_first_use(llama, monkeypatch):
    """A layer the plan keeps is mapped at its first use, in the compute thread: from a cold page cache each was read
    from the disk there, a page fault at a time, behind the compute. The next two kept layers not loaded yet are read
    into the page cache ahead now (from enable on, and at each kept layer's first use), each once; the output is the
    loaded model's."""
    from hf_layerstream.engine import LayerLoader

    ckpt, shards, inputs, expected, pad = llama
    events = []
    real_warm, real_load = LayerLoader._warm_file, LayerLoader._load_device_resident

    def warm(self, index):
        events.append(("warm", index))
        real_warm(self, index)

    def load(self, index):
        ready = real_load(self, index)
        events.append(("load", index, set(self._warmed)))  # (asked for by then)
        return ready

    monkeypatch.setattr(LayerLoader, "_warm_file", warm)
    monkeypatch.setattr(LayerLoader, "_load_device_resident", load)
    drop_from_page_cache(sorted((shards / "layers").iterdir()))
    model = streamed_model(ckpt, shards)  # (every layer kept)
    loader = get_streaming_state(model).loader
    assert loader.plan.device_layers == list(range(6))
    assert torch.equal(model.generate(**inputs, **GEN, pad_token_id=pad), expected)
    warmed = [e[1] for e in events if e[0] == "warm"]
    assert sorted(warmed) == list(range(6)) == sorted(set(warmed))  # (each once)
    loads = [e for e in events if e[0] == "load"]
    assert [e[1] for e in loads] == list(range(6))  # (once each: kept)
    for _, i, asked in loads:  # (the next two asked for as each kept layer is first loaded)
        assert set(range(i + 1, min(i + 3, 6))) <= asked, (i, asked)
    loader._warmer.shutdown(wait=True)  # (done: every file read in)
    for path in sorted((shards / "layers").iterdir()):
        assert cached_share(path) == 1.0, path
    disable_layer_streaming(model)


def test_pinned_host_gives_an_empty_buffer_for_nothing(monkeypatch):
    """A host-kept resident tensor of no elements: `mmap` refuses an empty map (ValueError), so the loader failed;
    an empty buffer is nothing to pin or register."""
    pinned, fake = _PinnedHost(torch.device("cuda", 0)), _FakeCudart()
    _fake_cuda(monkeypatch, fake)
    buf = pinned.empty(0)
    assert buf.numel() == 0 and buf.dtype == torch.uint8 and not pinned._held
    pinned.free(buf)
    pinned.release()
    assert fake.unregistered == []
