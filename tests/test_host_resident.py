"""Resident parts kept in host RAM: a GPU too small for the embeddings and head (a 70B model's are 2 GiB each at a
128k vocabulary) still runs the model, exactly.

The plan moves them (tested here with CUDA budgets; planning needs no GPU). The mechanism is the same on every device:
on CPU the tests force the plan, and the hooks, placeholders, `state_dict` and `save_pretrained` are checked against
the fully loaded model; the `cuda` test runs it where the copies are real.
"""

from __future__ import annotations

import dataclasses
import json

import _models
import numpy as np
import pytest
import torch
from conftest import (
    anon_growth_under_autocast,
    assert_same_decode_steps,
    build_meta_model,
    generate_from_threads,
    shaped_shard_dir,
    streamed_model,
)
from transformers import AutoConfig, AutoTokenizer

from hf_layerstream import ShardDirectory, disable_layer_streaming, enable_layer_streaming, get_streaming_state
from hf_layerstream.engine import budget_shortfall, fit_prefetch, plan_residency, size_text
from hf_layerstream.hooks import HostResident, HostResidentHook
from hf_layerstream.stream import host_candidates

GEN = {"max_new_tokens": 6, "do_sample": False}
CUDA0 = torch.device("cuda", 0)


def _layer_and_resident(shards):
    m = ShardDirectory(shards)
    return m, m.unit("layers.0").logical_nbytes, m.unit("resident").logical_nbytes


def _nbytes(shards, *names):
    unit = ShardDirectory(shards).unit("resident").tensors
    return sum(unit[n].numel * unit[n].dtype.itemsize for n in names)


# --- which parts, and when ------------------------------------------------------------------------------------------


def test_candidates_are_the_embeddings_then_the_head(checkpoints):
    """Untied (Llama): the embeddings (nothing copied: looked up on the host), then the head (copied for each pass).
    Tied (GPT-2): the embeddings only, whose host tensor the head copies for each pass."""
    _, llama = checkpoints("llama")
    embeddings, head = _nbytes(llama, "model.embed_tokens.weight"), _nbytes(llama, "lm_head.weight")
    assert host_candidates(ShardDirectory(llama)) == [
        ("input_embeddings", embeddings, 0),
        ("output_embeddings", head, head),
    ]
    # at another compute dtype, the sizes are at that dtype
    assert host_candidates(ShardDirectory(llama), torch.bfloat16)[1] == ("output_embeddings", head // 2, head // 2)
    _, gpt2 = checkpoints("gpt2")
    wte = _nbytes(gpt2, "transformer.wte.weight")
    assert host_candidates(ShardDirectory(gpt2)) == [("input_embeddings", wte, wte)]


def test_plan_moves_the_embeddings_then_the_head_only_while_the_gpu_budget_is_short(checkpoints):
    _, shards = checkpoints("llama")
    m, layer, resident = _layer_and_resident(shards)
    candidates = host_candidates(m)
    (_, embeddings, _), (_, head, _) = candidates
    host = {"cpu": "1GiB"}

    def plan(device_budget, **kw):
        return plan_residency(
            m, CUDA0, max_memory={0: device_budget, **host}, prefetch=1, reserve=0, host_candidates=candidates, **kw
        )

    fits = plan(resident + 2 * layer)  # resident parts and prefetch + 1 layers: nothing moves
    assert fits.host_resident == [] and fits.resident_bytes == resident and fits.host_resident_bytes == 0
    short = plan(resident + 2 * layer - 1)  # the embeddings move first: they cost nothing per pass
    assert short.host_resident == ["input_embeddings"]
    assert (short.resident_bytes, short.host_resident_bytes, short.host_resident_copied) == (
        resident - embeddings,
        embeddings,
        0,
    )
    shorter = plan(resident - embeddings + 2 * layer - 1)  # then the head, copied for each pass
    assert shorter.host_resident == ["input_embeddings", "output_embeddings"]
    assert shorter.resident_bytes == resident - embeddings - head and shorter.host_resident_copied == head
    assert "input embeddings, looked up there" in shorter.summary()
    assert "output head, copied to the device for each forward pass" in shorter.summary()
    assert shorter.to_dict()["host_resident"] == ["input_embeddings", "output_embeddings"]
    for p in (fits, short, shorter):  # each budget holds what its plan keeps on the device
        assert budget_shortfall(p, {0: p.budgets["0"]}) is None
        assert p.device_layers == [] and p.host_layers == list(range(m.num_layers))  # (the host budget holds them)
    # what stays in host RAM comes off the host's budget for layers kept there
    roomy = plan(resident - embeddings + 2 * layer - 1, keep_in_page_cache=False)
    assert roomy.host_layers and roomy.host_resident_bytes
    # (a host budget of those layers alone: what the parts in host RAM take leaves room for fewer)
    tight_host = {0: resident - embeddings + 2 * layer - 1, "cpu": len(roomy.host_layers) * layer}
    fewer = plan_residency(m, CUDA0, max_memory=tight_host, prefetch=1, reserve=0, host_candidates=candidates)
    assert len(fewer.host_layers) < len(roomy.host_layers)
    # a device budget of 0 asks for every layer streamed, not for the resident parts off the device
    assert plan(0).host_resident == [] and plan(0).resident_bytes == resident
    # on CPU the host is the device: nothing to move
    on_cpu = plan_residency(m, torch.device("cpu"), max_memory={"cpu": 0}, prefetch=1, host_candidates=candidates)
    assert on_cpu.host_resident == []


def test_a_head_copy_larger_than_a_layer_is_planned_for():
    """The head's copy is on the device with the `prefetch` layers read ahead for the next pass: a head larger than
    a layer (a 70B model's, 2.1 GB against 1.7 GB) is what the device must hold then, and the plan and the warning
    count it."""
    layer, head, resident = 1000, 3000, 5000
    shards = shaped_shard_dir(4, layer, resident)
    candidates = [("input_embeddings", head, 0), ("output_embeddings", head, head)]
    enough = resident - 2 * head + head + layer  # the head's copy and one layer read ahead (prefetch 1)
    plan = plan_residency(
        shards, CUDA0, max_memory={0: enough, "cpu": 0}, prefetch=1, reserve=0, host_candidates=candidates
    )
    assert plan.host_resident == ["input_embeddings", "output_embeddings"]
    assert budget_shortfall(plan, {0: enough}) is None
    warning = budget_shortfall(plan, {0: enough - 1})
    assert warning is not None and "the head's copy and the 1 layer read ahead while it runs" in warning
    assert "resident parts on the device" in warning
    # prefetch 0: the head's copy alone is what the device holds beyond the resident parts (not "and the 0 layers")
    shards = shaped_shard_dir(4, layer, 2 * head + 1000)
    plan = plan_residency(
        shards, CUDA0, max_memory={0: 1000 + head, "cpu": 0}, prefetch=0, reserve=0, host_candidates=candidates
    )
    assert plan.host_resident == ["input_embeddings", "output_embeddings"] and plan.resident_bytes == 1000
    assert budget_shortfall(plan, {0: 1000 + head}) is None
    warning = budget_shortfall(plan, {0: 1000 + head - 1})
    assert warning is not None and "on the device (1000 B) and the head's copy (2.9 KiB):" in warning, warning
    # on CPU (no head's copy), prefetch 0: one layer in flight, so named
    plan = plan_residency(shards, torch.device("cpu"), max_memory={"cpu": 1}, prefetch=0)
    warning = budget_shortfall(plan, {"cpu": 1})
    assert warning is not None and "the 1 layer in flight with prefetch=0 " in warning, warning
    # a GPU's budget for no layer, host RAM for every one: they are copied from there, not streamed from disk
    plan = plan_residency(shards, CUDA0, max_memory={0: 1, "cpu": 100 * layer}, prefetch=0, reserve=0)
    assert plan.host_layers == [0, 1, 2, 3] and not plan.streamed
    warning = budget_shortfall(plan, {0: 1})
    assert (
        warning is not None and "no layer is kept on the device (4 layers in host RAM, copied for each pass)" in warning
    )
    assert "streamed" not in warning, warning
    plan = plan_residency(shards, CUDA0, max_memory={0: 1, "cpu": 2 * layer}, prefetch=0, reserve=0)
    assert plan.host_layers and plan.streamed
    assert "copied for each pass, the rest streamed from disk)" in budget_shortfall(plan, {0: 1})


def test_default_prefetch_is_lowered_until_a_gpu_budget_holds_it(checkpoints):
    """The default `prefetch` is a choice for speed; on a GPU too small for the resident parts and that many layers in
    flight it is lowered until they fit (with the resident parts in host RAM where the plan moves them), down to 0.
    A budget of 0, and CPU plans, are left as they are."""
    _, shards = checkpoints("llama")
    m, layer, resident = _layer_and_resident(shards)
    candidates = host_candidates(m)
    embeddings = candidates[0][1]

    def fitted(device_budget, device=CUDA0):
        budget = {_key(device): device_budget, "cpu": "1GiB"}
        return fit_prefetch(
            lambda p: plan_residency(m, device, max_memory=budget, prefetch=p, host_candidates=candidates), 2
        )

    assert fitted(10 * 2**30).prefetch == 2
    # the layers in flight fit, once the plan has moved the embeddings and head to make room for its reserve
    roomy = fitted(resident + 3 * layer)
    assert roomy.prefetch == 2 and roomy.host_resident == ["input_embeddings", "output_embeddings"]
    # prefetch 1 with the embeddings in host RAM, and a tenth of the budget left for activations and the KV cache
    lowered = fitted((resident - embeddings + 2 * layer) * 10 // 9 + 10)
    assert lowered.prefetch == 1 and lowered.host_resident == ["input_embeddings"]
    assert budget_shortfall(lowered, None) is None and lowered.reserve == lowered.budgets["0"] // 10
    # the same without that tenth: one layer less in flight
    assert fitted(resident - embeddings + 2 * layer).prefetch == 0
    assert fitted(resident - embeddings + layer).prefetch == 0
    tiny = fitted(layer // 2)  # not even one layer: 0, and the warning says what the peak will be
    assert tiny.prefetch == 0
    warning = budget_shortfall(tiny, None)
    assert warning.startswith("The default budget of cuda:0") and "Each step less" not in warning
    assert fitted(0).prefetch == 2  # every layer streamed, as asked
    cpu = torch.device("cpu")
    assert fitted(layer // 2, cpu).prefetch == 2  # (on CPU only a `max_memory["cpu"]` lowers it: the next test)


def test_on_cuda_the_default_reads_further_ahead_only_with_room_no_kept_layer_needs(checkpoints):
    """On CUDA the default `prefetch` goes by layer size (tiny layers here: `CUDA_MAX_PREFETCH`, capped at the n - 1
    layers the loader reads ahead), but a plan starts from 2 (fitted to the budget) and reads further ahead only where
    that keeps the same layers on the device and in host RAM and the same resident parts there: a kept layer saves
    its copy at every sweep. Every budget gives the
    prefetch-2 plan's residency; a budget of 0 (or leftover room: with layers of one size the plan keeps one more
    layer instead, so it reads further ahead only when it keeps none) gives deeper read-ahead within the budget."""
    from hf_layerstream.engine import _least_need
    from hf_layerstream.stream import CUDA_MAX_PREFETCH, plan_shard_dir

    _, shards = checkpoints("llama", num_hidden_layers=6)
    m, layer, resident = _layer_and_resident(shards)
    n = m.num_layers

    def plan(budget, prefetch=None):
        return plan_shard_dir(m, CUDA0, prefetch=prefetch, max_memory={0: budget, "cpu": "1GiB"})

    # every layer streamed, as asked: from host RAM, or with none there, from the disk; as far ahead as the loader
    # reads (n - 1 layers: 5 here, not the 8 the layer size gives)
    assert n - 1 < CUDA_MAX_PREFETCH
    assert plan(0).prefetch == n - 1 and plan(0).host_layers == list(range(n))
    off_host = plan_shard_dir(m, CUDA0, max_memory={0: 0, "cpu": 0})
    assert off_host.prefetch == n - 1 and off_host.streamed == list(range(n))
    same = 0
    for budget in range(resident, resident + (n + 4) * layer * 10 // 9, max(layer // 7, 1)):
        base = fit_prefetch(lambda p, b=budget: plan(b, p), 2)
        got = plan(budget)
        kept = (got.device_layers, got.host_layers, got.host_resident)
        assert kept == (base.device_layers, base.host_layers, base.host_resident), budget
        if len(got.device_layers) == n:  # (nothing copied to the device: read-ahead does not matter)
            continue
        assert base.prefetch <= got.prefetch <= CUDA_MAX_PREFETCH
        if got.prefetch > base.prefetch:
            assert _least_need(got)[0] + got.reserve <= budget
        elif got.prefetch == 2:
            # deeper would have given up a kept layer (or a resident part's place on the device), or not fitted
            more = plan(budget, 3)
            gives_up = (more.device_layers, more.host_resident) != (got.device_layers, got.host_resident)
            assert gives_up or _least_need(more)[0] + more.reserve > budget, budget
            same += 1
    assert same  # (budgets where reading further ahead would have cost a kept layer were met)


def test_on_cuda_reading_further_ahead_stays_within_the_host_budget(checkpoints):
    """A layer streamed from the disk to a GPU is read into a pinned staging buffer, one for each of the `prefetch + 1`
    layers in flight, which the plan counts in `max_memory["cpu"]` before the layers it keeps there. Where that budget
    keeps none (less than 4 layers' room at prefetch 2), reading further ahead than 2 took 9 buffers (tiny layers:
    `CUDA_MAX_PREFETCH`), beyond the budget; it reads ahead only as far as the budget holds. (A budget of 0, as for the
    device, asks for nothing: the previous test.)"""
    from hf_layerstream.stream import plan_shard_dir

    _, shards = checkpoints("llama", num_hidden_layers=6)
    m = ShardDirectory(shards)
    stored = max(m.unit(f"layers.{i}").size for i in range(m.num_layers))
    for layers in (3, 3.5, 3.99):
        cpu = int(layers * stored)
        plan = plan_shard_dir(m, CUDA0, max_memory={0: 0, "cpu": cpu})
        assert plan.host_layers == [] and plan.prefetch == 2, (layers, plan.prefetch)
    # with room for a layer more the plan keeps it in host RAM, as at prefetch 2
    plan = plan_shard_dir(m, CUDA0, max_memory={0: 0, "cpu": 4 * stored})
    assert plan.host_layers == [0] and plan.prefetch == 2


def test_on_cuda_the_default_prefetch_is_lowered_until_the_host_budget_holds_its_staging_buffers(checkpoints, capsys):
    """The pinned staging buffers (one per layer in flight read from the disk) count in `max_memory["cpu"]` before the
    layers kept there; where the default `prefetch`'s passed it (2.5 layers' room: 3 buffers at prefetch 2), the plan
    kept prefetch 2 and pinned past the caller's budget, with a warning only. The default is lowered until they fit,
    as it is for the device's budget; the layers kept in host RAM take the room left after that. A `prefetch` given is
    kept (and warned about: the next test), and a budget that not even one buffer fits gets prefetch 0, and the
    warning."""
    from hf_layerstream.cli import main
    from hf_layerstream.engine import _over_host_budget, budget_warnings
    from hf_layerstream.stream import plan_shard_dir

    _, shards = checkpoints("llama", num_hidden_layers=6)
    m = ShardDirectory(shards)
    stored = max(m.unit(f"layers.{i}").size for i in range(m.num_layers))
    for layers, prefetch, host in ((2.5, 1, []), (2.99, 1, []), (1.5, 0, []), (0.5, 0, []), (4, 2, [0])):
        budget = {0: 0, "cpu": int(layers * stored)}
        plan = plan_shard_dir(m, CUDA0, max_memory=budget)
        assert (plan.prefetch, plan.host_layers) == (prefetch, host), layers
        assert _over_host_budget(plan) == (layers < 1), layers  # (even one buffer passes half a layer: warned)
        assert bool(budget_warnings(plan, budget)) == (layers < 1), layers
    # a `prefetch` given is kept, past the budget
    given = plan_shard_dir(m, CUDA0, max_memory={0: 0, "cpu": int(2.5 * stored)}, prefetch=2)
    assert given.prefetch == 2 and _over_host_budget(given)
    if not torch.cuda.is_available():  # (`inspect` plans for a GPU this machine lacks, as `enable` would)
        spec = f"0=0,cpu={int(2.5 * stored)}"
        assert main(["inspect", str(shards), "--device", "cuda", "--max-memory", spec]) == 0
        out = capsys.readouterr().out
        assert "6 streamed from disk (prefetch 1)" in out and "warning" not in out, out


def test_on_cuda_a_host_budget_the_staging_buffers_pass_is_warned_about(checkpoints, capsys):
    """A GPU plan reading layers from the disk pins a staging buffer for each layer in flight, counted in
    `max_memory["cpu"]`; where they alone pass it with the `prefetch` given (the default is lowered until they fit: the
    test above), pinned memory past the caller's host budget went without a word, in `enable` and in `inspect` (which
    warned for the device's budget only). Now a warning names the buffers and the bytes pinned; none within the
    budget, for a budget of 0 (nothing asked of host RAM), or on CPU (`budget_shortfall` tells there)."""
    from hf_layerstream.cli import main
    from hf_layerstream.engine import host_budget_shortfall
    from hf_layerstream.stream import plan_shard_dir

    _, shards = checkpoints("llama", num_hidden_layers=6)
    m = ShardDirectory(shards)
    stored = max(m.unit(f"layers.{i}").size for i in range(m.num_layers))
    budget = {0: 0, "cpu": int(2.5 * stored)}
    plan = plan_shard_dir(m, CUDA0, max_memory=budget, prefetch=2)
    assert plan.host_layers == [] and plan.prefetch == 2
    warning = host_budget_shortfall(plan, budget)
    assert warning is not None and warning.startswith(f"max_memory['cpu'] = {size_text(budget['cpu'])} cannot hold")
    assert f"3 staging buffers for the layers read from the disk with prefetch=2 ({size_text(3 * stored)})" in warning
    assert "Each step less of `prefetch`" in warning
    for fits in ({0: 0, "cpu": 3 * stored}, {0: 0, "cpu": 4 * stored}, {0: 0, "cpu": 0}, {0: 0}):
        assert host_budget_shortfall(plan_shard_dir(m, CUDA0, max_memory=fits, prefetch=2), fits) is None, fits
    fewer = plan_shard_dir(m, CUDA0, max_memory=budget, prefetch=1)  # two buffers: within it
    assert host_budget_shortfall(fewer, budget) is None
    on_cpu = {"cpu": 1}
    assert host_budget_shortfall(plan_shard_dir(m, torch.device("cpu"), max_memory=on_cpu), on_cpu) is None
    if not torch.cuda.is_available():  # (`inspect` plans for a GPU this machine lacks)
        spec = f"0=0,cpu={budget['cpu']}"
        assert main(["inspect", str(shards), "--device", "cuda", "--max-memory", spec, "--prefetch", "2"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("warning"))
        assert "--max-memory cpu = " in line and "3 staging buffers" in line and "--prefetch 2" in line, line


def test_on_cpu_the_default_prefetch_is_lowered_by_a_cpu_budget_not_by_the_available_memory(monkeypatch):
    """On CPU the layers in flight are file pages, which the kernel reclaims as it needs: a small available memory does
    not lower the default (lowering it was measured no faster, see `fit_prefetch`). The caller's `max_memory["cpu"]`
    does, as a GPU's budget does: a 70B model's embeddings and head (3.9 GiB) and four 1.6 GiB layers in flight
    (prefetch 3) need 10.3 GiB."""
    from hf_layerstream import engine

    layer, part = 1_711_309_824, 2_101_346_304
    shards = shaped_shard_dir(80, layer, 2 * part + 16_384)
    available = {"bytes": 0}
    monkeypatch.setattr(engine, "available_host_memory", lambda: available["bytes"])

    def prefetch_with(gib, budget=None):
        available["bytes"] = int(gib * 2**30)
        max_memory = None if budget is None else {"cpu": budget}
        plan = fit_prefetch(
            lambda p: plan_residency(shards, torch.device("cpu"), prefetch=p, max_memory=max_memory), 3, max_memory
        )
        return plan.prefetch

    assert [prefetch_with(gib) for gib in (64, 14, 8, 4, 1)] == [3] * 5
    need = {p: 2 * part + 16_384 + (p + 1) * layer for p in range(4)}
    assert [prefetch_with(64, need[p]) for p in range(4)] == [0, 1, 2, 3]
    assert prefetch_with(64, need[1] - 1) == 0 and prefetch_with(64, need[0] - 1) == 0  # (0: the least there is)
    assert prefetch_with(4, "13GiB") == 3  # (a budget, not the available memory)
    assert prefetch_with(4, 0) == 3  # 0 asks for every layer streamed: it sets nothing
    # every layer kept (a budget that holds them): nothing is in flight, nothing to lower (nor to log as lowered)
    plan = fit_prefetch(
        lambda p: plan_residency(shards, torch.device("cpu"), prefetch=p, max_memory={"cpu": "1TiB"}), 3
    )
    assert not plan.streamed and plan.prefetch == 3


def _key(device):
    return "cpu" if device.type == "cpu" else device.index


def test_a_70b_model_is_planned_onto_a_4_gib_gpu():
    """Llama-3-70B's sizes at bf16 (80 layers of 1.71 GB; embeddings and head of 2.10 GB each) on a 4 GiB GPU's
    default budget (80% of about 3.7 GiB free): the embeddings and head go to host RAM and layers come one at a time.
    A 24 GiB GPU keeps them and 5 layers (with 3 in flight and its reserve)."""
    layer, part = 1_711_309_824, 2_101_346_304
    shards = shaped_shard_dir(80, layer, 2 * part + 16_384)
    candidates = [("input_embeddings", part, 0), ("output_embeddings", part, part)]

    def plan(budget):
        return fit_prefetch(
            lambda p: plan_residency(
                shards, CUDA0, max_memory={0: budget, "cpu": "64GiB"}, prefetch=p, host_candidates=candidates
            ),
            2,
        )

    small = plan(int(0.8 * 3.7 * 2**30))
    assert small.host_resident == ["input_embeddings", "output_embeddings"] and small.prefetch == 0
    assert small.device_layers == [] and budget_shortfall(small, None) is None
    large = plan(int(0.8 * 23.5 * 2**30))
    assert large.host_resident == [] and large.prefetch == 2 and len(large.device_layers) == 5


# --- the mechanism, exact -------------------------------------------------------------------------------------------


@pytest.fixture
def force_host_resident(monkeypatch):
    """Plans that keep every candidate in host RAM (what a small GPU's budget gives), on any device."""
    _force_host_resident(monkeypatch)


def _force_host_resident(monkeypatch):
    import hf_layerstream.stream as stream

    plan = stream.plan_residency

    def forced(*args, host_candidates=None, **kwargs):
        p = plan(*args, host_candidates=host_candidates, **kwargs)
        return dataclasses.replace(
            p,
            host_resident=[name for name, _, _ in host_candidates],
            host_resident_bytes=sum(size for _, size, _ in host_candidates),
            host_resident_copied=max((copied for _, _, copied in host_candidates), default=0),
        )

    monkeypatch.setattr(stream, "plan_residency", forced)


@pytest.mark.parametrize(
    "arch, embeddings, head",
    [
        ("llama", "model.embed_tokens", "lm_head"),
        ("gemma", "model.embed_tokens", None),  # tied head; `embed_scale` buffer multiplied in the embeddings' pass
        ("gpt2", "transformer.wte", None),  # tied head
    ],
)
def test_host_resident_parts_stream_exactly(checkpoints, force_host_resident, tmp_path, arch, embeddings, head):
    ckpt, shards = checkpoints(arch)
    ref = _models.load_reference(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[2], return_tensors="pt")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    state = get_streaming_state(model)
    assert "kept in host RAM" in state.plan.summary()
    emb = model.get_input_embeddings()
    # between passes: a placeholder with the shape, dtype and device of the weight, and no storage
    weight = emb.weight
    assert isinstance(weight, HostResident) and weight.device == state.device and model.device == state.device
    assert weight.shape == ref.get_input_embeddings().weight.shape and model.dtype == torch.float32
    refusal = rf"'{embeddings}.weight' is kept in host RAM by layer streaming.*Read it from `model.state_dict\(\)`"
    # (`.numpy()` and `.tolist()` were torch's own refusal: "not supported for tensor subclasses", naming neither the
    # weight nor what works)
    for read in (
        weight.sum,
        lambda: weight.sum().item(),
        weight.numpy,
        weight.detach().tolist,
        lambda: np.asarray(weight),
    ):
        with pytest.raises(RuntimeError, match=refusal):
            read()
    assert isinstance(emb._hf_hook, HostResidentHook) and emb._hf_hook.on_host
    out_head = model.get_output_embeddings()
    assert isinstance(out_head._hf_hook, HostResidentHook) and not out_head._hf_hook.on_host
    assert (out_head.weight is weight) == (head is None)  # a tied head shares the placeholder
    assert model.hf_device_map[embeddings] == "cpu" and model.hf_device_map.get(head, "cpu") == "cpu"

    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    kw = {**GEN, "pad_token_id": tok.pad_token_id}
    assert torch.equal(model.generate(**inputs, **kw), ref.generate(**inputs, **kw))
    assert isinstance(emb.weight, HostResident)  # put back after each pass

    # state_dict gives the weights themselves; save_pretrained writes a checkpoint that loads as the original
    expected = ref.state_dict()
    got = model.state_dict()
    for name in (f"{embeddings}.weight", f"{head or embeddings}.weight"):
        assert type(got[name]) is torch.Tensor and torch.equal(got[name], expected[name]), name
    model.save_pretrained(tmp_path / "saved")
    again = _models.load_reference(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, ref(**inputs).logits)

    assert "forward" in vars(model)  # (the head runs outside the runner's pass: the model's forward is guarded too)
    disable_layer_streaming(model)
    assert "forward" not in vars(model)
    assert emb.weight.is_meta and not hasattr(emb, "_hf_hook") and not hasattr(out_head, "_hf_hook")
    assert not emb._state_dict_hooks and not out_head._state_dict_hooks
    assert all(not isinstance(t, HostResident) for t in model.state_dict().values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: the head is tied to the embeddings
def test_a_host_resident_head_requires_grad_as_the_loaded_one_frozen_or_not(checkpoints, force_host_resident, arch):
    """The head kept in host RAM requires grad as the loaded model's head does, frozen (`requires_grad_(False)`) or
    not, so a batch's prompt pass takes its `matmul` path (a frozen head `bmm`s a batch-sized copy of its weight,
    which can give other bits than the folded product) and bits; with gradients on, nothing takes part in autograd."""
    ckpt, shards = checkpoints(arch, dtype=torch.bfloat16)
    ref = _models.load_reference(ckpt, dtype=torch.bfloat16)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    assert isinstance(model.get_output_embeddings().weight, HostResident)
    from torch.profiler import profile

    tok = AutoTokenizer.from_pretrained(ckpt)
    batch = tok(list(_models.SAMPLE_PROMPTS), return_tensors="pt", padding=True)
    head, ref_head = model.get_output_embeddings(), ref.get_output_embeddings()
    torch.manual_seed(0)
    last = torch.randn(3, 9, model.config.hidden_size, dtype=torch.bfloat16)[:, -1:, :]  # (what the prompt pass gives)
    for frozen in (False, True):  # (as loaded, then frozen as the caller freezes a model)
        if frozen:
            ref.requires_grad_(False)
            model.requires_grad_(False)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                ops = []
                for m in (ref_head, head):
                    with profile() as prof:
                        out = m(last)
                    ops.append({e.name for e in prof.events()} & {"aten::bmm", "aten::mm"})
                bmm = frozen and not _models.matmul_folds(last)  # (torch 2.14 folds this slice for a frozen head)
                assert ops[0] == ops[1] == ({"aten::bmm"} if bmm else {"aten::mm"}), (frozen, grad, ops)
                assert torch.equal(out, ref_head(last)) and out.grad_fn is None
                got = model(**batch, logits_to_keep=1).logits
                assert torch.equal(got, ref(**batch, logits_to_keep=1).logits), (frozen, grad)
                assert got.grad_fn is None
    disable_layer_streaming(model)


def test_profile_has_the_host_resident_parts(checkpoints, force_host_resident):
    """`profile=True` times the embeddings' pass and the head's copy and pass, once per forward pass, apart from the
    layers'."""
    ckpt, shards = checkpoints("llama")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1, profile=True)
    model.generate(**inputs, **GEN, pad_token_id=tok.pad_token_id)
    state = get_streaming_state(model)
    profile = state.last_profile
    passes = profile["totals"]["forward_calls"]
    assert passes == GEN["max_new_tokens"]
    host = profile["host_resident"]
    assert set(host) == {"input_embeddings", "output_embeddings"}
    assert all(h["calls"] == passes and h["compute"] > 0 for h in host.values())
    assert host["output_embeddings"]["copy"] > 0 and host["input_embeddings"]["copy"] == 0
    summary = state.profile.summary()
    assert f"in host RAM ({passes} passes)" in summary and f"in host RAM ({passes} passes, copy H2D" in summary


def test_quantized_shards_with_host_resident_parts(checkpoints, monkeypatch):
    """4-bit shards (the resident parts stay full precision): the parts in host RAM give what the same shards give
    with them on the device, bit for bit."""
    pytest.importorskip("bitsandbytes")
    ckpt, shards = checkpoints("llama", compression="4bit")
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    kept = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    with torch.no_grad():
        expected = kept(ids).logits
    disable_layer_streaming(kept)
    _force_host_resident(monkeypatch)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    assert isinstance(model.get_output_embeddings().weight, HostResident)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("model_type", ["llava", "gemma3"])
def test_vision_language_model_with_host_resident_parts(tmp_path, force_host_resident, model_type):
    """A vision-language model's input embeddings (its language model's) in host RAM: the image's features are
    merged into embeddings sent back to the device, and the decode steps are the loaded model's (Gemma-3: tied and
    scaled embeddings)."""
    from test_architectures import _save_vision_language, _streamed_vision_language, _vision_language
    from transformers import AutoModelForImageTextToText

    from hf_layerstream import split_checkpoint

    config, inputs = _vision_language(model_type)
    _save_vision_language(config, tmp_path / "checkpoint")
    shards = split_checkpoint(tmp_path / "checkpoint", tmp_path / "shards", progress=False)
    ref = _models.load_reference(tmp_path / "checkpoint", auto_class=AutoModelForImageTextToText)
    streamed = _streamed_vision_language(shards, prefetch=1)
    assert get_streaming_state(streamed).plan.host_resident[0] == "input_embeddings"
    assert isinstance(streamed.get_input_embeddings()._hf_hook, HostResidentHook)
    assert_same_decode_steps(ref, streamed, inputs)


def test_host_resident_parts_with_generate_from_several_threads(checkpoints, force_host_resident, monkeypatch):
    """Worker threads calling `generate` at once: the head runs outside the pass over the layers, and without a lock
    one thread's head put the placeholder back under another's matmul (a head that takes a while, as a large one's
    copy does, is what this test gives it). Every call gives its prompt's exact output."""
    import time

    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    head = model.get_output_embeddings()
    forward = head._old_forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(head, "_old_forward", slow)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = _models.load_reference(ckpt)
    prompts = [_models.SAMPLE_PROMPTS[i % 3] for i in range(4)]
    kw = {**GEN, "pad_token_id": tok.pad_token_id}
    wanted = [ref.generate(**tok(p, return_tensors="pt"), **kw) for p in prompts]
    generate_from_threads(model, tok, prompts, wanted, **kw)
    assert isinstance(model.get_output_embeddings().weight, HostResident)


def _head_raises_in(call, head, monkeypatch) -> None:
    """`call()` with the head's forward raising (out of memory for a long prompt's logits, on a small GPU): its copy
    is in place while it runs and let go as the exception leaves (the placeholder back, not at the next call); then
    the head's forward is restored."""
    forward = head._old_forward

    def fail(*args, **kwargs):
        assert not isinstance(head.weight, HostResident)
        raise MemoryError("injected")

    monkeypatch.setattr(head, "_old_forward", fail)
    with pytest.raises(MemoryError, match="injected"), torch.no_grad():
        call()
    assert isinstance(head.weight, HostResident)
    monkeypatch.setattr(head, "_old_forward", forward)


def test_a_pass_that_raises_in_the_head_lets_go_of_its_copy(checkpoints, force_host_resident, monkeypatch):
    """A forward pass that raises inside the head does not keep the head's copy on the device until the next pass,
    and the next call is exact."""
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 22]])
    _head_raises_in(lambda: model(ids), model.get_output_embeddings(), monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_direct_call_of_the_head_that_raises_lets_go_of_its_copy(checkpoints, force_host_resident, monkeypatch):
    """The head called on its own (outside the model's forward, which the pass guard wraps) that raises lets go of
    its copy too, and the next call gives the loaded head's logits."""
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    ref = _models.load_reference(ckpt)
    head = model.get_output_embeddings()
    x = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _head_raises_in(lambda: head(x), head, monkeypatch)
    with torch.no_grad():
        assert torch.equal(head(x), ref.get_output_embeddings()(x))
    assert isinstance(head.weight, HostResident)


def test_failed_enable_leaves_no_host_hooks(checkpoints, force_host_resident, monkeypatch):
    """A failure after the host parts were hooked undoes them with the rest: the model can be streamed again."""
    import hf_layerstream.stream as stream

    ckpt, shards = checkpoints("llama")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    with monkeypatch.context() as patch:
        patch.setattr(stream, "add_hook_to_module", _fail_on_layers(stream.add_hook_to_module))
        with pytest.raises(RuntimeError, match="injected"):
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert all(not hasattr(m, "_hf_hook") and "__reduce_ex__" not in vars(m) for m in model.modules())
    assert model.get_input_embeddings().weight.is_meta
    assert not model.get_input_embeddings()._state_dict_hooks
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert isinstance(model.get_input_embeddings().weight, HostResident)
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 22]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_disable_frees_the_host_copies_before_emptying_the_caches(checkpoints, force_host_resident, monkeypatch):
    """On CUDA, `disable_layer_streaming` ends by handing torch's cached memory back (`empty_allocator_caches`); the
    host-resident parts' tensors (pinned; from torch's pinned allocator where registering failed) must be freed by
    then, or their blocks stay cached by torch until the process ends. Here the loader says CUDA at disable only."""
    import weakref

    import hf_layerstream.stream as stream

    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    state = get_streaming_state(model)
    hosts = [weakref.ref(host) for module in state.host_modules for *_, host in module._hf_hook.slots]
    assert len(hosts) == 2  # the embeddings and the head
    alive = []
    monkeypatch.setattr(stream, "empty_allocator_caches", lambda device: alive.append([r() for r in hosts]))
    state.loader.is_cuda = True
    del state
    disable_layer_streaming(model)
    assert alive == [[None, None]]


def _fail_on_layers(add_hook):
    from hf_layerstream.hooks import LayerStreamingHook

    def add(module, hook, *args, **kwargs):
        if isinstance(hook, LayerStreamingHook) and hook.index == 1:
            raise RuntimeError("injected")
        return add_hook(module, hook, *args, **kwargs)

    return add


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_copying_a_model_with_host_resident_parts_is_refused_with_the_fix_named(checkpoints, force_host_resident, arch):
    """`copy.deepcopy` of a streamed model whose embeddings and head are kept in host RAM (a small GPU's plan) reached
    their placeholders before the loader, and was refused with theirs ("read it from `model.state_dict()`, or give
    the GPU more `max_memory`"): it is refused as any streamed model's copy, naming `disable_layer_streaming`, as is
    `pickle`; once disabled, the model copies as any."""
    import copy
    import pickle

    ckpt, shards = checkpoints(arch)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    assert isinstance(model.get_output_embeddings().weight, HostResident)
    for copy_it in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"call `disable_layer_streaming\(model\)` first"):
            copy_it(model)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    disable_layer_streaming(model)
    assert "__deepcopy__" not in vars(model)
    copy.deepcopy(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_shallow_copy_of_a_host_resident_module_is_refused_as_a_layers_is(checkpoints, force_host_resident, arch):
    """`copy.copy` of the embeddings or head kept in host RAM (a small GPU's plan) made a module sharing the original's
    hook and accelerate's forward (which ran the original): once streaming was disabled, calling it failed with
    "AttributeError: ... '_hf_hook'". It is refused as a streamed layer's is (and as `pickle` of it is), naming
    `disable_layer_streaming`; once disabled, the module copies as any, and its copy runs."""
    import copy
    import pickle

    ckpt, shards = checkpoints(arch)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    hooked = get_streaming_state(model).host_modules
    assert {id(model.get_input_embeddings()), id(model.get_output_embeddings())} <= {id(m) for m in hooked}
    for module in hooked:
        for copy_it in (copy.copy, pickle.dumps):
            with pytest.raises(TypeError, match=r"call `disable_layer_streaming\(model\)` first"):
                copy_it(module)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    disable_layer_streaming(model)
    for module in hooked:
        assert "__reduce_ex__" not in vars(module)  # (the module as it was before)
        twin = copy.copy(module)
        given = ids if isinstance(module, torch.nn.Embedding) else torch.zeros(1, 2, model.config.hidden_size)
        assert twin(given.to("meta")).is_meta  # (meta weights: a meta output)


def test_inspect_shows_the_host_resident_parts(checkpoints, capsys):
    """`hf-layerstream inspect` plans as `enable_layer_streaming` does, the host parts included; for a GPU this
    machine lacks too, from its budget (planning for the machine one is about to rent)."""
    from hf_layerstream.cli import main

    _, shards = checkpoints("llama")
    m, layer, resident = _layer_and_resident(shards)
    budget = resident + 3 * layer - 1  # prefetch 2 (the default), less a tenth for activations: short
    argv = ["inspect", str(shards), "--json", "--device", "cuda", "--max-memory", f"0={budget}", "--prefetch", "2"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    plan = info["plan"]
    assert info["device_available"] == torch.cuda.is_available() and plan["device"].startswith("cuda")
    assert plan["host_resident"][0] == "input_embeddings"
    assert plan["resident_bytes"] == resident - plan["host_resident_bytes"]
    assert main(argv[:2] + argv[3:]) == 0  # the table
    out = capsys.readouterr().out
    assert "kept in host RAM (input embeddings, looked up there" in out
    assert ("(not on this machine)" in out) == (not torch.cuda.is_available())
    if not torch.cuda.is_available():  # without a budget for it there is nothing to plan with
        assert main(["inspect", str(shards), "--device", "cuda:1", "--max-memory", "0=4GiB"]) == 2
        assert "cuda:1 is not available here: to plan for it anyway" in capsys.readouterr().err
    # with no --prefetch, the default is lowered as `enable_layer_streaming` lowers it
    embeddings = host_candidates(m)[0][1]
    budget = (resident - embeddings + 2 * layer) * 10 // 9 + 10  # (and a tenth for activations)
    assert main(["inspect", str(shards), "--json", "--device", "cuda", "--max-memory", f"0={budget}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"]["prefetch"] == 1 and info["warning"] is None


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_host_resident_parts_on_cuda(checkpoints, arch):
    """A GPU budget too small for the embeddings and head: they stay in host RAM (the head, or the tied embeddings,
    copied for each pass) and the output is the model's on the GPU, bit for bit."""
    ckpt, shards = checkpoints(arch)
    m, layer, resident = _layer_and_resident(shards)
    ref = _models.load_reference(ckpt).to("cuda")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok(_models.SAMPLE_PROMPTS[1], return_tensors="pt").to("cuda")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    enable_layer_streaming(model, shards, device="cuda", max_memory={0: resident + 2 * layer, "cpu": 0}, prefetch=1)
    state = get_streaming_state(model)
    assert state.plan.host_resident and model.device == torch.device("cuda", torch.cuda.current_device())
    kw = {**GEN, "pad_token_id": tok.pad_token_id}
    assert torch.equal(model.generate(**inputs, **kw), ref.generate(**inputs, **kw))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    head = model.get_output_embeddings()._hf_hook
    assert all(host.is_pinned() for _, _, _, host in head.slots)
    if state.loader._pinned._registering:  # pinned at their exact size, with the loader's other pinned buffers
        assert {host.data_ptr() for _, _, _, host in head.slots} <= set(state.loader._pinned._held)
    disable_layer_streaming(model)


def test_the_heads_copy_is_queued_under_the_models_device(monkeypatch):
    """The head's copy to the device enters the model's device before the copy stream: leaving the stream's block
    restores the device current at its start, and in a thread that set none (a model on cuda:1) that would create a
    context on cuda:0 (stand-ins for the device, stream and event on CPU: the GPU's own run is in the `cuda` tests)."""
    from contextlib import contextmanager

    gpu = torch.device("cuda", 1)
    entered = []

    def context(kind):
        @contextmanager
        def enter(value):
            entered.append((kind, value))
            yield
            entered.append((f"left {kind}", value))

        return enter

    class Event:
        def record(self, stream):
            entered.append(("event", stream))

    class Compute:
        def wait_event(self, event):
            entered.append(("compute waits", None))

    copy_stream = object()
    monkeypatch.setattr(torch.cuda, "device", context("device"))
    monkeypatch.setattr(torch.cuda, "stream", context("stream"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Compute())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    head = torch.nn.Linear(4, 4, bias=False)
    hook = HostResidentHook(
        [(head, "weight", True, torch.ones(4, 4))],
        gpu,
        on_host=False,
        copy_stream=copy_stream,
        before_copy=lambda: entered.append(("released layers passed", None)),
    )
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self.clone())  # (no GPU here)
    values = hook._copies()
    assert [kind for kind, _ in entered] == [
        "released layers passed",  # (the last layer's memory free again before the copy is allocated)
        "device",
        "stream",
        "event",
        "left stream",
        "left device",
        "compute waits",
    ]
    assert entered[1] == ("device", gpu) and entered[2] == ("stream", copy_stream)
    assert len(values) == 1 and torch.equal(values[0], torch.ones(4, 4))


def test_the_heads_copy_waits_for_the_gpu_to_pass_the_layers_released(checkpoints, force_host_resident):
    """The head's copy was allocated while the GPU still ran the last layer, whose memory (freed with
    `record_stream`) the allocator cannot reuse until then: the device held the head's copy, the layers read ahead
    and that layer, one more than the plan counts. The copy now first waits for the newest release event (the
    compute stream passes them in order), leaving the events to the loader. (Stand-in events: no GPU here.)"""
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    loader = get_streaming_state(model).loader
    assert model.get_output_embeddings()._hf_hook.before_copy == loader.wait_released_passed
    waited = []

    class Event:
        def __init__(self, name):
            self.name = name

        def synchronize(self):
            waited.append(self.name)

    loader.wait_released_passed()  # none released: nothing to wait for
    assert waited == []
    for name in ("layer 2", "layer 3"):  # (as `_let_go` records a streamed layer's release on CUDA)
        loader._released.append(Event(name))
        loader._last_released = loader._released[-1]
    loader.wait_released_passed()
    assert waited == ["layer 3"] and [e.name for e in loader._released] == ["layer 2", "layer 3"]
    # the loader may have taken the events from its queue while the GPU still runs the last layer: still waited on
    loader._released.clear()
    loader.wait_released_passed()
    assert waited == ["layer 3", "layer 3"]
    loader._last_released = None
    disable_layer_streaming(model)


def test_under_autocast_the_heads_copies_do_not_pile_up(tmp_path, force_host_resident):
    """The head kept in host RAM is copied to the device for each pass, a new weight each time: under
    `torch.autocast` torch kept the cast of each until the block ended (a GPU would fill up with them, a cast of the
    head per token). Autocast's cache is off during the head's pass now (see `hooks.autocast_cache_off`). (Planned on
    CPU here, where the "copy" is a new Parameter over the host tensor: the casts piled up alike.)"""
    from hf_layerstream import split_checkpoint

    config = _models.make_config("llama", num_hidden_layers=2, hidden_size=256, vocab_size=32000)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    model = streamed_model(ckpt, shards)
    assert "output_embeddings" in get_streaming_state(model).plan.host_resident
    head_cast = 2 * 32000 * 256
    grown = anon_growth_under_autocast(model, torch.tensor([[1, 5, 9, 33]]))
    if grown is None:
        pytest.skip("needs /proc/self/status")
    assert grown < 6 * head_cast, (grown, head_cast)  # (12 passes: 12 casts kept before; a margin for malloc's own)
    disable_layer_streaming(model)
