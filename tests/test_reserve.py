"""`reserve`: the part of a GPU's budget the plan leaves free for activations and the KV cache (a tenth of the budget,
at most 2 GiB, by default), given by the user as `enable_layer_streaming(reserve=...)` and `--reserve`.

Plans for a GPU are made here with explicit budgets: no GPU needed (the `cuda` test runs one for real)."""

from __future__ import annotations

import json
import logging

import _models
import pytest
import torch
from conftest import build_meta_model, shaped_shard_dir
from transformers import AutoConfig, AutoTokenizer

from hf_layerstream import ShardDirectory, disable_layer_streaming, enable_layer_streaming, get_streaming_state
from hf_layerstream.cli import build_parser, main
from hf_layerstream.engine import _least_need, budget_shortfall, check_reserve_within, plan_residency, size_text
from hf_layerstream.stream import plan_shard_dir

CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")


def _sizes(shards):
    m = ShardDirectory(shards)
    return m, m.unit("layers.0").logical_nbytes, m.unit("resident").logical_nbytes


def test_a_reserve_given_is_the_room_a_gpu_plan_leaves(checkpoints):
    """The plan keeps on the GPU what its budget holds less the reserve: a larger reserve keeps fewer layers, 0 keeps
    the most; as bytes or a size string (as `max_memory` takes them); shown in the summary and `to_dict()`."""
    _, shards = checkpoints("llama", num_hidden_layers=6)
    m, layer, resident = _sizes(shards)
    budget = resident + 5 * layer  # (prefetch 1: 2 layers in flight, 3 layers of room with no reserve)

    def plan(reserve=None, **kw):
        return plan_shard_dir(m, CUDA0, prefetch=1, max_memory={0: budget, "cpu": 0}, reserve=reserve, **kw)

    default = plan()
    assert default.reserve == budget // 10
    assert len(default.device_layers) == (budget - resident - 2 * layer - budget // 10) // layer
    none = plan(0)
    assert none.reserve == 0 and len(none.device_layers) == 3
    one = plan(layer)
    assert one.reserve == layer and len(one.device_layers) == 2
    assert plan(f"{layer}B").device_layers == one.device_layers and plan(str(layer)).reserve == layer
    two = plan(2 * layer)
    assert len(two.device_layers) == 1 and two.host_resident == []
    for p in (none, one, two):
        assert p.planned_use() <= budget and p.to_dict()["reserve"] == p.reserve
        assert json.loads(json.dumps(p.to_dict()))["reserve"] == p.reserve
    assert f"0: {size_text(budget)} ({size_text(2 * layer)} of it reserved for activations and the KV cache)" in (
        two.summary()
    )
    # a size string as max_memory's values: "1GiB" is 2**30 bytes
    big = plan_shard_dir(m, CUDA0, prefetch=1, max_memory={0: "4GiB", "cpu": 0}, reserve="1GiB")
    assert big.reserve == 2**30 and "1.00 GiB of it reserved" in big.summary()


def test_the_default_prefetch_and_the_embeddings_make_room_for_the_reserve_given(checkpoints):
    """The reserve given is the one the plan is fitted with: the default `prefetch` is lowered (`fit_prefetch`) and
    the resident parts moved to host RAM for it, as for the default reserve; what the plan needs with it fits."""
    _, shards = checkpoints("llama", num_hidden_layers=6)
    m, layer, resident = _sizes(shards)
    budget = resident + 3 * layer

    def plan(reserve, **kw):
        return plan_shard_dir(m, CUDA0, max_memory={0: budget, "cpu": "1GiB"}, reserve=reserve, **kw)

    roomy = plan(0)
    assert roomy.prefetch >= 2 and roomy.host_resident == []
    for reserve in (layer, 2 * layer, 3 * layer):
        fitted = plan(reserve)
        assert fitted.reserve == reserve
        assert _least_need(fitted)[0] + reserve <= budget or fitted.prefetch == 0, reserve
        assert fitted.prefetch < roomy.prefetch or fitted.host_resident, reserve
        assert budget_shortfall(fitted, {0: budget}) is None or fitted.prefetch == 0


def test_a_budget_short_of_the_reserve_given_is_warned_about_with_its_fix():
    """`budget_shortfall` counts the plan's reserve as `fit_prefetch` does: a budget that holds the resident parts
    and the layers in flight but not the reserve with them was not warned about; it is, naming the reserve and the
    largest that fits."""
    unit = 2**20
    m = shaped_shard_dir(4, 10 * unit, 40 * unit)
    budget = {0: 70 * unit, "cpu": 0}
    plan = plan_residency(m, CUDA0, max_memory=budget, prefetch=1, reserve=20 * unit)
    assert plan.device_layers == [] and _least_need(plan)[0] == 60 * unit
    warning = budget_shortfall(plan, budget)
    assert warning is not None and "with the `reserve` for activations and the KV cache (20.0 MiB)" in warning
    assert "peak memory will still reach about 80.0 MiB" in warning and "A `reserve` of at most 10.0 MiB" in warning
    fits = plan_residency(m, CUDA0, max_memory=budget, prefetch=1, reserve=10 * unit)
    assert budget_shortfall(fits, budget) is None
    # the budget named as given: a JSON config's "0" is max_memory['0'] (it was named max_memory[0])
    assert warning.startswith("max_memory[0] = 70.0 MiB cannot hold")
    digits = {"0": 70 * unit, "cpu": 0}
    assert budget_shortfall(plan, digits) == warning.replace("max_memory[0]", "max_memory['0']")


@pytest.mark.parametrize(
    "reserve, message",
    [
        (-1, "`reserve` sizes must be finite and non-negative, got -1."),
        ("-1GiB", "`reserve` got the size '-1GiB'"),
        ("lots", "`reserve` got the size 'lots'; use bytes (a non-negative int) or a string such as '4GiB'"),
        (1.5, "`reserve` got the size 1.5: a number is bytes, a whole number."),
        ("500Mb", "`reserve` got the size '500Mb', whose lowercase b accelerate reads as bits"),
        (True, "`reserve` got True: give the bytes to leave free on the GPU"),
        ([1], "`reserve` got the size [1]"),
    ],
)
def test_a_reserve_that_is_not_a_size_is_refused_naming_it(checkpoints, reserve, message):
    _, shards = checkpoints("llama", num_hidden_layers=6)
    error = TypeError if isinstance(reserve, (bool, list)) else ValueError  # (another type than a size's: TypeError)
    with pytest.raises(error) as e:
        plan_shard_dir(ShardDirectory(shards), CUDA0, max_memory={0: "1GiB"}, reserve=reserve)
    assert message in str(e.value)
    ckpt, _ = checkpoints("llama", num_hidden_layers=6)
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    with pytest.raises(error) as e:  # (on CPU too, where it is ignored: refused before anything is loaded)
        enable_layer_streaming(model, shards, device="cpu", reserve=reserve)
    assert message in str(e.value) and get_streaming_state(model) is None


def test_a_reserve_larger_than_the_gpu_budget_is_refused(checkpoints):
    """It is part of the budget: more than it leaves nothing for the model. A budget of 0 (every layer streamed, no
    limit) takes any."""
    _, shards = checkpoints("llama", num_hidden_layers=6)
    m = ShardDirectory(shards)
    with pytest.raises(ValueError) as e:
        plan_shard_dir(m, CUDA0, max_memory={0: "1GiB", "cpu": 0}, reserve="2GiB")
    assert str(e.value) == (
        "`reserve` = 2.00 GiB is more than the budget of cuda:0 (max_memory[0]: 1.00 GiB), which it is part of: "
        "nothing would be left for the model. Give a smaller `reserve`, or a larger max_memory[0]."
    )
    # (as enable checks it before a hub repo's layers download, against the budget given or the default one)
    with pytest.raises(ValueError) as before:
        check_reserve_within(2 * 2**30, CUDA0, {0: "1GiB"})
    assert str(before.value) == str(e.value)
    # named as given: a JSON config's "0" is max_memory['0'] (it was named max_memory[0], a key the caller lacked)
    digits = str(e.value).replace("max_memory[0]", "max_memory['0']")
    assert "(max_memory['0']: 1.00 GiB)" in digits and digits.endswith("or a larger max_memory['0'].")
    with pytest.raises(ValueError) as given:
        check_reserve_within(2 * 2**30, CUDA0, {"0": "1GiB"})
    assert str(given.value) == digits
    with pytest.raises(ValueError) as planned:
        plan_shard_dir(m, CUDA0, max_memory={"0": "1GiB", "cpu": 0}, reserve="2GiB")
    assert str(planned.value) == digits
    check_reserve_within(2 * 2**30, CUDA0, None)
    with pytest.raises(ValueError, match=r"\(the default budget, 80% of its free memory: 1.00 GiB\)"):
        check_reserve_within(2 * 2**30, CUDA0, None, 2**30)
    assert plan_shard_dir(m, CUDA0, max_memory={0: "1GiB", "cpu": 0}, reserve="1GiB").reserve == 2**30
    assert plan_shard_dir(m, CUDA0, max_memory={0: 0, "cpu": 0}, reserve="2GiB").device_layers == []


def test_a_budget_of_0_leaves_the_reserve_unused(checkpoints):
    """A GPU budget of 0 streams every layer with no limit: a reserve given has no budget to be part of, and the
    summary said "0: 0 B (2.00 GiB of it reserved ...)". The plan's is 0, as without one (and as on CPU)."""
    _, shards = checkpoints("llama", num_hidden_layers=6)
    m = ShardDirectory(shards)
    without = plan_shard_dir(m, CUDA0, prefetch=1, max_memory={0: 0, "cpu": 0})
    got = plan_shard_dir(m, CUDA0, prefetch=1, max_memory={0: 0, "cpu": 0}, reserve="2GiB")
    assert got.reserve == 0 and got.to_dict() == without.to_dict() and got.summary() == without.summary()
    assert got.streamed == list(range(6)) and got.summary().endswith("[budget cpu: 0 B, 0: 0 B]"), got.summary()


def test_enable_checks_the_reserve_against_the_default_budget_before_finding_the_shards(checkpoints, monkeypatch):
    """With no `max_memory` for the GPU, a reserve larger than its default budget (a share of its free memory) was
    refused only once the plan was made: for a hub repo, after its layers had downloaded. It is refused before the
    shard directory is looked up, as one larger than a budget given is; and a GPU given twice in `max_memory` is named
    as the plan names it, not as a budget the reserve passes. (A GPU stood in for: the device and its free memory.)"""
    import hf_layerstream.engine as engine
    import hf_layerstream.stream as stream

    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    monkeypatch.setattr(stream, "check_device", lambda device: CUDA0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (2**30, 8 * 2**30))

    def looked_up(*args, **kwargs):
        raise AssertionError("the shard directory was looked up (a hub repo's layers downloaded)")

    monkeypatch.setattr(stream, "local_shard_dir", looked_up)
    assert engine.default_device_budget(CUDA0) == int(0.8 * 2**30)
    cases = [
        (None, "(the default budget, 80% of its free memory: 0.80 GiB)"),
        ({"cpu": "4GiB"}, "(the default budget, 80% of its free memory: 0.80 GiB)"),
        ({"0": "1GiB"}, "(max_memory['0']: 1.00 GiB)"),
        ({0: "1GiB", "0": "4GiB"}, "`max_memory` gives GPU 0 twice, as 0 and '0': give its budget once."),
    ]
    for max_memory, message in cases:
        model = build_meta_model(AutoConfig.from_pretrained(ckpt))
        with pytest.raises(ValueError) as e:
            enable_layer_streaming(model, "org/shards", device="cuda", max_memory=max_memory, reserve="3GiB")
        assert message in str(e.value), max_memory
        assert get_streaming_state(model) is None
    with pytest.raises(AssertionError, match="was looked up"):  # (one that fits goes on)
        enable_layer_streaming(model, "org/shards", device="cuda", reserve="0.5GiB")


def test_on_cpu_a_reserve_is_ignored_with_a_warning(checkpoints, caplog):
    """The reserve is room on a GPU: on CPU the plan keeps none (activations take host RAM, outside the plan), and a
    reserve other than 0 is named as ignored, once; the plan is the one without it."""
    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    m, layer, resident = _sizes(shards)
    budget = {"cpu": resident + 4 * layer}
    without = plan_shard_dir(m, CPU, prefetch=1, max_memory=budget, keep_in_page_cache=False)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        got = plan_shard_dir(m, CPU, prefetch=1, max_memory=budget, keep_in_page_cache=False, reserve="1GiB")
    assert got.reserve == 0 and got.device_layers == without.device_layers
    warned = [r.getMessage() for r in caplog.records if "`reserve`" in r.getMessage()]
    assert warned == [
        "`reserve` (1.00 GiB) is room kept free on a GPU for activations and the KV cache; the model streams on the "
        "CPU, where they take host RAM and the plan keeps none: ignored. Pass device='cuda' to stream on a GPU."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert plan_shard_dir(m, CPU, prefetch=1, max_memory=budget, reserve=0).reserve == 0
    assert "`reserve`" not in caplog.text
    # enable takes it, and streams as without it
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        enable_layer_streaming(model, shards, device="cpu", max_memory=budget, prefetch=1, reserve=2**30)
    try:
        assert "`reserve` (1.00 GiB) is room kept free on a GPU" in caplog.text
        assert get_streaming_state(model).plan.reserve == 0
        assert get_streaming_state(model).plan.device_layers == without.device_layers
    finally:
        disable_layer_streaming(model)


# --- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "inspect", "demo", "bench"])
def test_each_command_that_plans_takes_reserve(command):
    args = {"generate": ["generate", "d"], "inspect": ["inspect", "d"], "demo": ["demo"], "bench": ["bench", "d"]}
    assert build_parser().parse_args([*args[command], "--reserve", "3GiB"]).reserve == "3GiB"
    assert build_parser().parse_args(args[command]).reserve is None


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reserve")
    ckpt = _models.save_tiny_checkpoint("llama", root / "ckpt")
    assert main(["split", str(ckpt), str(root / "shards"), "--quiet"]) == 0
    return ckpt, root / "shards"


def test_inspect_shows_the_reserve_given(split_dir, capsys):
    """`inspect --reserve` plans with it: in the plan's JSON (`plan.reserve`) and its summary."""
    if torch.cuda.is_available():
        pytest.skip("plans for a GPU this machine lacks")
    _, shards = split_dir
    argv = ["inspect", str(shards), "--device", "cuda", "--max-memory", "0=1GiB,cpu=0"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["reserve"] == 2**30 // 10  # (the default: a tenth)
    assert main([*argv, "--json", "--reserve", "300MiB"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["reserve"] == 300 * 2**20
    assert main([*argv, "--reserve", "0"]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan on"))
    assert "[budget cpu: 0 B, 0: 1.00 GiB (0 B of it reserved for activations and the KV cache)]" in plan, plan
    # a budget of 0 (every layer streamed, no limit) leaves none: not "0: 0 B (2.00 GiB of it reserved ...)"
    zero = ["inspect", str(shards), "--device", "cuda", "--max-memory", "0=0,cpu=0", "--reserve", "2GiB"]
    assert main(zero) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan on"))
    assert plan.endswith("[budget cpu: 0 B, 0: 0 B]"), plan
    assert main([*zero, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["reserve"] == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reserve", "lots"], "error: `--reserve` got the size 'lots'"),
        (["--reserve=-1GiB"], "error: `--reserve` got the size '-1GiB'"),
        (
            ["--reserve", "2GiB"],
            "error: `--reserve` = 2.00 GiB is more than the budget of cuda:0 (--max-memory 0: 1.00 GiB), which it is "
            "part of: nothing would be left for the model. Give a smaller `--reserve`, or a larger --max-memory 0.",
        ),
    ],
)
def test_inspect_refuses_a_bad_reserve_naming_the_option(split_dir, capsys, extra, message):
    if torch.cuda.is_available():
        pytest.skip("plans for a GPU this machine lacks")
    _, shards = split_dir
    assert main(["inspect", str(shards), "--device", "cuda", "--max-memory", "0=1GiB", *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_passes_reserve_to_the_plan(split_dir, capsys, caplog):
    """On CPU it is ignored, and said so with the options' names: the plan got it."""
    _, shards = split_dir
    argv = ["generate", str(shards), "Hello", "--max-new-tokens", "2", "--device", "cpu", "--reserve", "1GiB"]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(argv) == 0
    assert "`--reserve` (1.00 GiB) is room kept free on a GPU" in caplog.text
    assert "Pass --device 'cuda' to stream on a GPU." in caplog.text


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_refuse_a_bad_reserve_before_any_work(tmp_path, capsys, command):
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    work = tmp_path / "work"
    argv = ["demo", "--dir", str(work), *tiny] if command == "demo" else ["bench", "--demo", "--work", str(work), *tiny]
    assert main([*argv, "--reserve", "lots"]) == 2
    assert "error: `--reserve` got the size 'lots'" in capsys.readouterr().err
    assert not (work / "checkpoint").exists()


def test_demo_and_bench_give_the_reserve_to_the_streamed_run(tmp_path, monkeypatch):
    """The streamed run (demo's; bench's `streamed` row, the one `--max-memory` budgets) is asked to plan with it,
    as bytes; the child that runs it passes it to `enable_layer_streaming`."""
    import hf_layerstream._measure as measure
    import hf_layerstream.cli as cli
    from hf_layerstream import bench

    specs = []

    def fake_child(spec, timeout=None):
        specs.append(dict(spec))
        return {"system": spec["system"], "batch": 1, "tokens": [1, 2], "s_per_token": 0.1, "peak_rss": 2**20}

    monkeypatch.setattr(measure, "run_child", fake_child)
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    argv = ["demo", "--dir", str(tmp_path / "demo"), *tiny, "--max-new-tokens", "2", "--device", "cpu"]
    assert main([*argv, "--reserve", "3GiB"]) == 0
    assert [s["system"] for s in specs] == ["in_memory", "streamed"] and specs[1]["reserve"] == 3 * 2**30
    assert "reserve" not in specs[0]
    specs.clear()
    monkeypatch.setattr(bench, "_run", lambda spec, timeout: fake_child(spec))
    argv = ["bench", "--demo", *tiny, "--work", str(tmp_path / "bench"), "--modes", "warm", "--paired-calls", "0"]
    main([*argv, "--systems", "streamed,streamed_disk", "--device", "cpu", "--reserve", "300MiB"])
    rows = [s for s in specs if s["system"] == "streamed"]
    assert [s.get("reserve") for s in rows] == [300 * 2**20, None], rows  # (streamed_disk: no budget, no reserve)
    asked = {}

    def fake_load(path, **kwargs):
        asked.update(kwargs)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(cli, "load_streamed_model", fake_load)
    measure._load({"system": "streamed", "path": str(tmp_path), "reserve": 2**30, "max_memory": {0: "8GiB"}})
    assert asked["reserve"] == 2**30 and asked["max_memory"] == {0: "8GiB"}


# --- on a GPU -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_a_reserve_given_streams_on_cuda_as_planned(checkpoints):
    """On a GPU: the plan made with the reserve given keeps the layers `plan_shard_dir` says, and the output is the
    model's, bit for bit."""
    ckpt, shards = checkpoints("llama", num_hidden_layers=6)
    m, layer, resident = _sizes(shards)
    budget = {0: resident + 5 * layer, "cpu": 0}
    ref = _models.load_reference(ckpt).to("cuda")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt").to("cuda")
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    with pytest.raises(ValueError, match="is more than the budget of cuda:0"):
        enable_layer_streaming(model, shards, device="cuda:0", max_memory=budget, reserve=budget[0] + 1)
    assert get_streaming_state(model) is None
    for reserve in (0, layer, f"{2 * layer}B"):
        model = build_meta_model(AutoConfig.from_pretrained(ckpt))
        enable_layer_streaming(model, shards, device="cuda:0", max_memory=budget, prefetch=1, reserve=reserve)
        try:
            plan = get_streaming_state(model).plan
            expected = plan_shard_dir(m, CUDA0, max_memory=budget, prefetch=1, reserve=reserve)
            assert plan.reserve == expected.reserve and plan.device_layers == expected.device_layers
            assert len(plan.device_layers) == {0: 3, layer: 2}.get(reserve, 1)
            assert torch.equal(model.generate(**inputs, **kw), ref.generate(**inputs, **kw))
        finally:
            disable_layer_streaming(model)
