"""PEFT adapters (LoRA) on a streaming model: attached inside `attaching_adapters`, the output is the loaded model's
with the same adapter, bit for bit; attached any other way, refused with the order that works named (it computed on
adapter weights PEFT had left on the meta device: NaN or noise, silently)."""

from __future__ import annotations

import _models
import pytest
import torch
from conftest import build_meta_model, streamed_model
from transformers import AutoConfig

from hf_layerstream import attaching_adapters, disable_layer_streaming, enable_layer_streaming, get_streaming_state

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 7, 12], [1, 40, 41, 42, 43, 44, 45, 46]])
GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
PLANS = {"kept": {}, "streamed": {"max_memory": {"cpu": 0}}}


@pytest.fixture(scope="module")
def adapter(checkpoints, tmp_path_factory):
    """(checkpoint, shards, adapter folder, the loaded model's (base logits, base tokens, adapted logits, adapted
    tokens)): a LoRA adapter on three projections of every layer, initialised at random so that it changes the
    output."""
    ckpt, shards = checkpoints("llama")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(folder)
    base = _models.load_reference(ckpt)
    with torch.no_grad():
        expected = [base(IDS).logits, base.generate(IDS, **GEN)]
        adapted = peft.PeftModel.from_pretrained(base, folder).eval()
        expected += [adapted(input_ids=IDS).logits, adapted.generate(input_ids=IDS, **GEN)]
    assert not torch.equal(expected[0], expected[2])  # (the adapter changes the output)
    return ckpt, shards, folder, expected


def _outputs(runner):
    with torch.no_grad():
        return runner(input_ids=IDS).logits, runner.generate(input_ids=IDS, **GEN)


@pytest.mark.parametrize("route", ["PeftModel.from_pretrained", "load_adapter"])
@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_an_adapter_attached_inside_the_block_gives_the_loaded_models_output(adapter, plan, route):
    """The base weights stream, adapted as the loaded model's are: logits and greedy tokens bit for bit, twice; the
    adapter switched off (PEFT's `disable_adapter`) gives the base model's; the device map is the model's again after the block, and disable
    leaves no hook."""
    ckpt, shards, folder, (base_logits, base_tokens, logits, tokens) = adapter
    model = streamed_model(ckpt, shards, **PLANS[plan])
    device_map = dict(model.hf_device_map)
    with attaching_adapters(model):
        if route == "load_adapter":
            model.load_adapter(str(folder))
            runner = model
        else:
            runner = peft.PeftModel.from_pretrained(model, folder).eval()
    assert model.hf_device_map == device_map
    for _ in range(2):
        got = _outputs(runner)
        assert torch.equal(got[0], logits) and torch.equal(got[1], tokens)
    if route != "load_adapter":  # (transformers 5.25's `disable_adapters` wants peft 0.22, not released)
        with runner.disable_adapter():
            assert all(map(torch.equal, _outputs(runner), (base_logits, base_tokens)))
    loader = get_streaming_state(model).loader
    disable_layer_streaming(model)
    assert not [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    assert not [t for t in loader._executor._threads if t.is_alive()]
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_disable_takes_the_peft_model_the_block_returned(adapter, plan):
    """README's `model = PeftModel.from_pretrained(model, adapter_dir)` inside the block names the `PeftModel` `model`,
    and `get_streaming_state` finds the state through it (PEFT hands attributes on to the model it wraps), but
    `disable_layer_streaming` of it failed half way, with `AttributeError: 'PeftModel' object has no attribute
    'hf_device_map'`: the hooks taken off, the state left on the model. It disables the model the wrapper holds,
    and returns the wrapper."""
    ckpt, shards, folder, (*_, logits, tokens) = adapter
    model = streamed_model(ckpt, shards, **PLANS[plan])
    base = model
    with attaching_adapters(model):
        model = peft.PeftModel.from_pretrained(model, folder).eval()
    assert get_streaming_state(model) is get_streaming_state(base) is not None
    got = _outputs(model)
    assert torch.equal(got[0], logits) and torch.equal(got[1], tokens)
    loader = get_streaming_state(model).loader
    assert disable_layer_streaming(model) is model
    assert get_streaming_state(model) is None and get_streaming_state(base) is None
    assert not hasattr(base, "hf_device_map") and not [n for n, m in base.named_modules() if hasattr(m, "_hf_hook")]
    assert not [t for t in loader._executor._threads if t.is_alive()]
    assert all(p.is_meta for n, p in base.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="not enabled"):
        disable_layer_streaming(model)


@pytest.mark.parametrize("route", ["load_adapter", "inject_adapter_in_model"])
@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_an_adapter_attached_outside_the_block_is_refused_at_the_next_pass(adapter, plan, route):
    """Attached to the streaming model as to any model, the adapter's weights stayed on the meta device (where PEFT
    put them, beside the streamed weights' placeholders, or where transformers' loader left them for layers the
    device map calls "disk"), and the layers computed on memory never written: NaN or noise, silently. The next pass
    raises now, naming a weight and the block. (Where every layer is kept, transformers' loader gives them values on
    the device, from the device map: those are the loaded model's.)"""
    ckpt, shards, folder, (*_, logits, tokens) = adapter
    model = streamed_model(ckpt, shards, **PLANS[plan])
    if route == "load_adapter":
        model.load_adapter(str(folder))
    else:
        config = peft.PeftConfig.from_pretrained(folder)
        peft.inject_adapter_in_model(config, model)
        peft.set_peft_model_state_dict(model, peft.load_peft_weights(str(folder)))
    if plan == "kept" and route == "load_adapter":
        # (every layer kept: the device map says "cpu" for all, where transformers' loader puts the adapter's
        # weights, with values: used as they are)
        got = _outputs(model)
        assert torch.equal(got[0], logits) and torch.equal(got[1], tokens)
        disable_layer_streaming(model)
        return
    with pytest.raises(RuntimeError, match=r"lora_[AB]\..*is on the meta device.*`hf_layerstream.attaching_adapters"):
        _outputs(model)
    with pytest.raises(RuntimeError, match="attaching_adapters"):  # (and at every pass after)
        _outputs(model)
    disable_layer_streaming(model)


def test_peft_model_from_pretrained_outside_the_block_names_it(adapter):
    """`PeftModel.from_pretrained` on a streaming model whose device map names "disk" re-dispatches it (accelerate's
    `remove_hook_from_submodules`, then `model.to`), which the streaming model refuses: the refusal names the
    block, and so does the next pass."""
    ckpt, shards, folder, _ = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    with pytest.raises(NotImplementedError, match=r"PEFT adapter.*`with hf_layerstream.attaching_adapters\(model\):`"):
        peft.PeftModel.from_pretrained(model, folder)
    with pytest.raises(RuntimeError, match="attaching_adapters"):
        _outputs(model)
    disable_layer_streaming(model)
    assert not [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]


@pytest.mark.parametrize("wrapped", [True, False], ids=["PeftModel", "injected"])
def test_enable_refuses_a_model_holding_adapter_layers(adapter, wrapped):
    """A model an adapter was attached to before enable (built on the meta device, its adapter weights have no
    values) is refused before any hook, naming the order that works: it failed as "a different model"."""
    ckpt, shards, folder, _ = adapter
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    if wrapped:
        model = peft.PeftModel.from_pretrained(model, folder)
    else:
        peft.inject_adapter_in_model(peft.PeftConfig.from_pretrained(folder), model)
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers.*attaching_adapters"):
        enable_layer_streaming(model, shards, device="cpu")
    assert get_streaming_state(model) is None


def test_the_block_needs_streaming_enabled_and_undoes_itself_on_error(adapter):
    ckpt, shards, folder, (base_logits, *_) = adapter
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    with pytest.raises(ValueError, match="not enabled"):
        with attaching_adapters(model):
            pass
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    device_map = dict(model.hf_device_map)
    with pytest.raises(KeyError):
        with attaching_adapters(model):
            assert not any(p.is_meta for p in model.model.layers.parameters())  # (the stand-ins)
            raise KeyError("the caller's")
    assert model.hf_device_map == device_map
    assert all(p.is_meta for p in model.model.layers.parameters())  # (the placeholders back)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base_logits)
    disable_layer_streaming(model)


def test_merging_an_adapter_into_streamed_weights_is_refused(adapter):
    """`merge_and_unload` writes the adapter into the base weights: a streamed layer's are read from the shard
    directory at each pass, so the write is refused (it would not reach them), naming where to merge."""
    ckpt, shards, folder, _ = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    with attaching_adapters(model):
        runner = peft.PeftModel.from_pretrained(model, folder)
    with pytest.raises(RuntimeError, match=r"Edit the loaded model's weights, save it"):
        runner.merge_and_unload()
    disable_layer_streaming(model)


@pytest.mark.parametrize("init", ["dora", "pissa"])
def test_an_initialisation_that_reads_or_writes_the_base_weights_is_refused(adapter, init):
    """A new DoRA adapter sets its magnitude from the base weights' norms, PiSSA decomposes them: inside the block
    those are stand-ins without values, and it ran silently (NaN or inf magnitudes; PiSSA's residual dropped as the
    block ended: logits 0.5-0.7 off). Refused now, naming the cause (DoRA as the block ends, PiSSA as its SVD meets
    the stand-ins' NaN); the base weights are placeholders again."""
    ckpt, shards, folder, (base_logits, *_) = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    options = {"use_dora": True} if init == "dora" else {"init_lora_weights": "pissa"}
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options)
    with pytest.raises(
        RuntimeError, match="DoRA's magnitude" if init == "dora" else "read or wrote a decoder layer's weights"
    ):
        with attaching_adapters(model):
            peft.get_peft_model(model, config)
    assert all(p.is_meta for n, p in model.model.layers.named_parameters() if "lora_" not in n)
    disable_layer_streaming(model)


def test_a_pass_inside_the_block_is_refused_and_one_after_it_is_exact(adapter):
    """A forward pass inside the block ran on the stand-ins and failed as "input_layernorm.weight was replaced by
    another tensor ... split it again"."""
    ckpt, shards, folder, (*_, logits, tokens) = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    with attaching_adapters(model):
        runner = peft.PeftModel.from_pretrained(model, folder).eval()
        with pytest.raises(RuntimeError, match="A forward pass ran inside `attaching_adapters`.*run it after"):
            _outputs(runner)
    assert all(map(torch.equal, _outputs(runner), (logits, tokens)))
    disable_layer_streaming(model)


@pytest.mark.parametrize("counting", ["registration_hooks", "every_pass"])
def test_an_adapter_deleted_and_loaded_again_under_its_name_outside_the_block_is_refused(
    adapter, monkeypatch, counting
):
    """The check looks at the adapters again whenever modules or parameters were registered since (torch's global
    registration hooks): it looked only when the adapters' names changed, so one deleted and loaded again under the
    same name, outside the block, computed on weights PEFT had left on the meta device (silently wrong). Delete it
    and load it inside the block, and the output is exact again. (A torch without those hooks: checked every pass.)"""
    from hf_layerstream import stream

    if counting == "every_pass":
        monkeypatch.setattr(stream, "_COUNTING", [None, None])
    ckpt, shards, folder, (*_, logits, tokens) = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    with attaching_adapters(model):
        runner = peft.PeftModel.from_pretrained(model, folder, adapter_name="a").eval()
        runner.load_adapter(folder, adapter_name="c")
    runner.set_adapter("c")
    assert all(map(torch.equal, _outputs(runner), (logits, tokens)))
    runner.delete_adapter("c")  # (PEFT's `load_adapter` re-dispatches a model holding one adapter: two here)
    runner.load_adapter(folder, adapter_name="c")
    runner.set_adapter("c")
    with pytest.raises(RuntimeError, match=r"is on the meta device.*`model.delete_adapter\('c'\)`"):
        _outputs(runner)
    runner.delete_adapter("c")
    with attaching_adapters(model):
        runner.load_adapter(folder, adapter_name="c")
    runner.set_adapter("c")
    assert all(map(torch.equal, _outputs(runner.eval()), (logits, tokens)))
    disable_layer_streaming(model)


def test_a_base_weight_replaced_inside_the_block_is_refused(adapter):
    """PiSSA's initialisation replaces the base weight (`weight.data = residual`): the stand-in went, silently, with
    what was put in it, and the layer computed with the shard directory's weight. Refused as the block ends, naming
    the weight; the model is as before."""
    ckpt, shards, folder, (base_logits, *_) = adapter
    model = streamed_model(ckpt, shards, **PLANS["streamed"])
    with pytest.raises(RuntimeError, match=r"decoder layer 1's mlp.down_proj.weight was replaced inside"):
        with attaching_adapters(model):
            weight = model.model.layers[1].mlp.down_proj.weight
            weight.data = torch.zeros(weight.shape)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base_logits)
    disable_layer_streaming(model)


def test_the_memory_adapters_take_is_logged_and_a_budget_it_passes_warned_about(adapter, caplog):
    """The adapters' weights are outside the residency plan (made before them): their bytes are logged as the block
    ends, and where with them the model holds more than the plan's budget, a warning names both and the ways out;
    also where two blocks' adapters pass it together. A budget of 0 (every layer streamed) is not a limit; one already
    short of the plan's need is not told to shrink further."""
    import logging

    from hf_layerstream.engine import size_text

    ckpt, shards, folder, _ = adapter

    def attach(model, name=None):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_layerstream"), attaching_adapters(model):
            model.load_adapter(str(folder), adapter_name=name)
        # (ours: transformers 5.15's `load_adapter` logs a load report of its own)
        ours = [r for r in caplog.records if r.name.startswith("hf_layerstream")]
        return [r.getMessage() for r in ours if r.levelno == logging.WARNING]

    def lora_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)

    roomy = streamed_model(ckpt, shards, max_memory={"cpu": "100GiB"})
    whole = get_streaming_state(roomy).plan.planned_use()  # (the resident parts and every layer)
    disable_layer_streaming(roomy)
    for budget, warned in ((whole * 2, False), (whole, True)):
        model = streamed_model(ckpt, shards, max_memory={"cpu": budget})
        plan = get_streaming_state(model).plan
        assert plan.streamed == [] and plan.planned_use() == whole
        warnings = attach(model)
        added = lora_bytes(model)
        assert added > 0
        assert f"The adapters attached hold {size_text(added)} on cpu, which the residency plan does not" in caplog.text
        assert f"it plans {size_text(whole)} of the budget of cpu, {size_text(budget)}" in caplog.text
        assert bool(warnings) == warned, warnings
        if warned:
            told = f"what it holds there ({size_text(whole + added)}) passes its budget ({size_text(whole)})"
            assert told in warnings[0] and "lower by theirs" in warnings[0]
            assert "split_checkpoint(..., adapter=...)" in warnings[0]
        disable_layer_streaming(model)
    # two blocks, each within the room the budget leaves and together past it: the second warns, counting both
    model = streamed_model(ckpt, shards, max_memory={"cpu": whole + added * 3 // 2})
    assert not attach(model, "first")
    warnings = attach(model, "second")
    assert lora_bytes(model) == 2 * added
    assert f"; {size_text(2 * added)} on cpu with those attached before" in caplog.text
    assert warnings and f"what it holds there ({size_text(whole + 2 * added)}) passes" in warnings[0]
    disable_layer_streaming(model)
    # every layer streamed (a budget of 0): no limit, said so
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    assert not attach(model) and "every layer streamed, as a budget of 0 asks" in caplog.text
    disable_layer_streaming(model)
    # a budget already short of the plan's need (warned as streaming was enabled): no advice to lower it
    model = streamed_model(ckpt, shards, max_memory={"cpu": 1})
    warnings = attach(model)
    assert len(warnings) == 1 and "already short of what the plan holds there" in warnings[0]
    assert "lower by theirs" not in warnings[0] and "split_checkpoint(..., adapter=...)" in warnings[0]
    disable_layer_streaming(model)


def test_on_a_gpu_only_the_adapter_weights_there_count_against_its_budget(caplog):
    """A GPU plan (arithmetic: no GPU needed) and adapter weights on the CPU as well as on the GPU (PEFT puts an
    adapter of a head kept in host RAM beside it, on the CPU): each device's bytes are logged, and only the GPU's
    count against its budget."""
    import logging

    from conftest import shaped_shard_dir

    from hf_layerstream.engine import plan_residency, size_text
    from hf_layerstream.stream import _note_adapter_memory

    unit = 2**20
    plan = plan_residency(
        shaped_shard_dir(4, 10 * unit, 40 * unit),
        torch.device("cuda", 0),
        max_memory={0: 100 * unit, "cpu": 200 * unit},
        prefetch=1,
        reserve=0,
    )
    room = 100 * unit - plan.planned_use()
    for on_gpu, warned in ((room, False), (room + 1, True)):
        new = {("cpu", 1): 50 * unit, ("cuda:0", 2): on_gpu}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_layerstream"):
            _note_adapter_memory(plan, new, dict(new))
        assert f"hold 50.0 MiB on cpu and {size_text(on_gpu)} on cuda:0, which the residency plan" in caplog.text
        assert any(r.levelno == logging.WARNING for r in caplog.records) == warned


@pytest.mark.parametrize("plan", ["kept", "streamed"])
def test_an_adapters_weights_get_the_loaded_models_gradients(adapter, plan):
    """An adapter made trainable inside the block (`PeftModel.from_pretrained(..., is_trainable=True)`): PEFT freezes
    the weights it adapts, and those of the streamed model stay frozen after the block, as the loaded model's (they
    counted as trainable, all of them, once the block ended: `print_trainable_parameters`, an optimizer over the
    parameters requiring grad); the loss with `labels` requires grad through the adapter's weights, so the backward
    pass runs (not the refusal of a training step on frozen weights) and gives each of them the loaded model's
    gradient, bit for bit, and the base weights none. (README, Limits: the graph holds every layer.)"""
    ckpt, shards, folder, _ = adapter
    loaded = peft.PeftModel.from_pretrained(_models.load_reference(ckpt), folder, is_trainable=True)
    model = streamed_model(ckpt, shards, **PLANS[plan])
    with attaching_adapters(model):
        streamed = peft.PeftModel.from_pretrained(model, folder, is_trainable=True)

    def trainable(runner):
        return [n for n, p in runner.named_parameters() if p.requires_grad]

    assert trainable(loaded) and all("lora_" in n for n in trainable(loaded))
    assert trainable(streamed) == trainable(loaded)
    grads = []
    for runner in (loaded, streamed):
        loss = runner(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads.append({n: p.grad for n, p in runner.named_parameters() if p.grad is not None})
    assert trainable(streamed) == trainable(loaded) == list(grads[0]) == list(grads[1])
    assert all(torch.equal(grads[1][n], g) for n, g in grads[0].items())
    disable_layer_streaming(model)
