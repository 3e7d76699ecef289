"""The scripts in `examples/` run as documented, on a local checkpoint (no hub), and give the fully loaded model's
output (fp32 shards: bit-exact)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from pathlib import Path

import _models
import pytest
import torch
from transformers import AutoTokenizer, pipeline

from hf_layerstream import ShardDirectory, generate_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"quickstart", "budget_and_profile", "batch_jsonl", "speculative"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart_splits_then_generates_as_the_loaded_model(checkpoints, tmp_path, capsys):
    ckpt, _ = checkpoints("llama")
    shards = tmp_path / "llama.layers"
    argv = [str(ckpt), "--shards", str(shards), "--device", "cpu", "--max-new-tokens", "6", "--prompt", "Once upon"]
    text = _example("quickstart").main(argv)
    ShardDirectory(shards).verify()  # the split it made is complete and valid
    out = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert "residency plan:" in out and tok.bos_token not in out  # (the streamer prints the text, not special tokens)
    ref = pipeline("text-generation", model=_models.load_reference(ckpt), tokenizer=tok)
    expected = ref("Once upon", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == expected
    # a second run finds the split done and gives the same text under a budget that streams every layer
    again = _example("quickstart").main([*argv, "--max-memory", '{"cpu": 0}'])
    assert again == expected


def test_quickstart_merges_an_adapter_as_it_splits(checkpoints, tmp_path, capsys, monkeypatch):
    """`--adapter`: the text is the loaded model's with the adapter merged (`merge_and_unload`); repeated, with each
    merged in turn."""
    peft = pytest.importorskip("peft")
    ckpt, _ = checkpoints("llama")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "adapter")
    argv = [str(ckpt), "--shards", str(tmp_path / "tuned.layers"), "--device", "cpu", "--max-new-tokens", "6"]
    text = _example("quickstart").main([*argv, "--prompt", "Once upon", "--adapter", str(tmp_path / "adapter")])
    tok = AutoTokenizer.from_pretrained(ckpt)
    merged = peft.PeftModel.from_pretrained(_models.load_reference(ckpt), tmp_path / "adapter").merge_and_unload()
    ref = pipeline("text-generation", model=merged, tokenizer=tok)
    expected = ref("Once upon", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    plain = pipeline("text-generation", model=_models.load_reference(ckpt), tokenizer=tok)
    assert (
        text
        == expected
        != plain("Once upon", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    )
    # `--adapter` repeated: each merged in turn, into a default folder named by the model and both adapters
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, target_modules=["k_proj", "o_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "second")
    monkeypatch.chdir(tmp_path)
    argv = [str(ckpt), "--device", "cpu", "--max-new-tokens", "6", "--prompt", "Once upon"]
    both = ["--adapter", str(tmp_path / "adapter"), "--adapter", str(tmp_path / "second")]
    text = _example("quickstart").main([*argv, *both])
    assert [r["id"] for r in ShardDirectory(tmp_path / f"{ckpt.name}+adapter+second.layers").manifest.adapter] == [
        str(tmp_path / "adapter"),
        str(tmp_path / "second"),
    ]
    merged = peft.PeftModel.from_pretrained(merged, tmp_path / "second").merge_and_unload()
    ref = pipeline("text-generation", model=merged, tokenizer=tok)
    assert text == ref("Once upon", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    with pytest.raises(SystemExit):
        _example("quickstart").main([*argv, *both, "--adapter-revision", "v1"])
    assert "give --adapter-revision once per --adapter" in capsys.readouterr().err


def test_quickstart_merges_a_hub_adapter_at_a_revision(checkpoints, tmp_path, monkeypatch, capsys):
    """`--adapter-revision`: a hub adapter at that tag (offline, from a hub cache that holds it only there), merged
    into a default folder named by the model, the adapter and the revision; without `--adapter` it is refused."""
    peft = pytest.importorskip("peft")
    from huggingface_hub import constants

    ckpt, _ = checkpoints("llama")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "adapter")
    files = {n: (tmp_path / "adapter" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    _models.hub_cache(tmp_path / "cache", "some-org/lora", files, ref="v2", commit="b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = [
        str(ckpt),
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        "--prompt",
        "Once upon",
        "--adapter",
        "some-org/lora",
    ]
    text = _example("quickstart").main([*argv, "--adapter-revision", "v2"])
    shards = ShardDirectory(tmp_path / f"{ckpt.name}+lora@v2.layers")
    assert (shards.manifest.adapter["id"], shards.manifest.adapter["revision"]) == ("some-org/lora", "b" * 40)
    tok = AutoTokenizer.from_pretrained(ckpt)
    merged = peft.PeftModel.from_pretrained(_models.load_reference(ckpt), tmp_path / "adapter").merge_and_unload()
    ref = pipeline("text-generation", model=merged, tokenizer=tok)
    assert text == ref("Once upon", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    with pytest.raises(FileNotFoundError, match="the hub cannot be reached"):  # (at main: not in the cache)
        _example("quickstart").main(argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _example("quickstart").main([str(ckpt), "--adapter-revision", "v2"])
    assert e.value.code == 2 and "pass the --adapter too" in capsys.readouterr().err


def test_budget_and_profile_reports_every_streamed_layer(checkpoints, capsys):
    ckpt, shards = checkpoints("llama")
    profile = _example("budget_and_profile").main([str(shards), "--device", "cpu", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    layers = ShardDirectory(shards).num_layers
    assert out.count(": disk") == layers  # the default budget of the example streams every layer
    assert sorted(profile["layers"]) == list(range(layers))
    assert profile["totals"]["forward_calls"] == 4
    assert all(t["calls"] == 4 and t["bytes_read"] > 0 for t in profile["layers"].values())
    assert "slowest layer:" in out
    # the text it prints is the loaded model's
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        ref = _models.load_reference(ckpt).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert tok.decode(ref[0], skip_special_tokens=True) + "\n" in out


@pytest.mark.parametrize("name", ["quickstart", "budget_and_profile"])
def test_the_examples_taking_a_budget_take_a_reserve_too(name, checkpoints, tmp_path, monkeypatch, caplog):
    """`enable_layer_streaming(reserve=)` (`--reserve` on the CLI) sets the part of a GPU's budget left free for
    activations and the KV cache; the examples taking a budget (`--max-memory`) had no option for it. They take
    `--reserve` and pass it on (on CPU ignored, with the library's warning)."""
    ckpt, shards = checkpoints("llama")
    module = _example(name)
    real, given = module.enable_layer_streaming, []

    def enable(*args, **kwargs):
        given.append(kwargs.get("reserve"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "enable_layer_streaming", enable)
    argv = [str(shards)] if name == "budget_and_profile" else [str(ckpt), "--shards", str(tmp_path / "shards")]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        module.main([*argv, "--device", "cpu", "--max-new-tokens", "1", "--reserve", "1GiB"])
    assert given == ["1GiB"]
    assert "`reserve` (1.00 GiB) is room kept free on a GPU" in caplog.text


def test_batch_jsonl_writes_the_loaded_models_completions(checkpoints, tmp_path, capsys):
    ckpt, shards = checkpoints("llama")
    prompts = ["Hello there", "The capital of France is", "a"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    dst = tmp_path / "results.jsonl"
    argv = [str(shards), str(src), str(dst), "--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu"]
    _example("batch_jsonl").main(argv)
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(ckpt)
    expected = generate_batch(
        _models.load_reference(ckpt), tok, prompts, batch_size=2, progress=False, max_new_tokens=5, do_sample=False
    )
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert [r["completion"] for r in rows] == expected
    capsys.readouterr()
    # the prompts from a pipe (`<(...)`), as `generate_jsonl` takes them: it refused one as "no input file"
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()))
    writer.start()
    try:
        _example("batch_jsonl").main([str(shards), str(fifo), str(tmp_path / "piped.jsonl"), *argv[3:]])
    finally:
        if writer.is_alive():  # (refused before it was read: let the writer go)
            with open(fifo, "rb") as f:
                f.read()
        writer.join()
    assert (tmp_path / "piped.jsonl").read_text() == dst.read_text()
    capsys.readouterr()


def test_batch_jsonl_names_a_missing_input_before_building_the_model(tmp_path, capsys):
    """A missing input file is a usage error (exit 2, the file named), not a traceback after the model is built."""
    with pytest.raises(SystemExit) as e:
        _example("batch_jsonl").main([str(tmp_path / "no_shards"), str(tmp_path / "none.jsonl"), str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no input file" in err and "none.jsonl" in err


def test_speculative_example_keeps_the_output_in_fewer_sweeps(checkpoints, capsys):
    ckpt, shards = checkpoints("llama")
    # the draft is the same model, loaded whole: every proposed token is accepted
    runs = _example("speculative").main([str(shards), str(ckpt), "--max-new-tokens", "12", "--device", "cpu"])
    plain, assisted = runs["plain"], runs["assisted"]
    assert plain["output_ids"] == assisted["output_ids"]
    assert plain["tokens"] == assisted["tokens"] > 1
    assert assisted["sweeps"] < plain["sweeps"]
    assert "same output: True" in capsys.readouterr().out
    # and both are the loaded model's greedy output
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = _models.load_reference(ckpt).generate(ids, max_new_tokens=12, do_sample=False)
    assert plain["output_ids"] == [ref[0, ids.shape[1] :].tolist()]


@pytest.mark.parametrize("name", ["quickstart", "budget_and_profile", "batch_jsonl", "speculative"])
def test_examples_document_their_command_line(name):
    module = _example(name)
    assert f"python examples/{name}.py" in module.__doc__
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("name", ["quickstart", "budget_and_profile", "batch_jsonl", "speculative"])
def test_every_option_of_an_example_is_described_in_its_help(name, monkeypatch):
    """The README sends readers to `python examples/NAME.py --help`, which listed options such as `--max-new-tokens`,
    `--batch-size` and `--device` with no word of what they do or default to."""
    import argparse

    class ParsedError(Exception):
        pass

    def parse_args(self, args=None, namespace=None):
        raise ParsedError(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(ParsedError) as e:
        _example(name).main([])
    parser = e.value.args[0]
    assert [a.dest for a in parser._actions if a.help is None] == []


def test_speculative_example_says_1_sweep_and_1_token(checkpoints, capsys):
    """One token asked for is one sweep, plain or assisted: the example printed "1 tokens in 1 sweeps"."""
    ckpt, shards = checkpoints("llama")
    runs = _example("speculative").main([str(shards), str(ckpt), "--max-new-tokens", "1", "--device", "cpu"])
    assert runs["plain"]["sweeps"] == runs["assisted"]["sweeps"] == 1
    out = capsys.readouterr().out
    assert "sweeps" not in out.replace("tokens/sweep", "") and "1 token in    1 sweep (" in out, out
