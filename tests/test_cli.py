"""The `hf-layerstream` console script: split, generate (argument and stdin), inspect, verify, demo, --help."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import _models
import pytest
import torch
from transformers import AutoTokenizer

from hf_layerstream.cli import build_parser, main

COMMANDS = ["split", "generate", "demo", "inspect", "verify"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert f"hf-layerstream {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(["hf-layerstream", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = _models.save_tiny_checkpoint("llama", root / "ckpt")
    assert main(["split", str(ckpt), str(root / "shards"), "--quiet"]) == 0
    return ckpt, root / "shards"


def _greedy_text(ckpt, prompt, n):
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = _models.load_reference(ckpt, attn_implementation=None)
    out = ref.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, -n:], skip_special_tokens=True)


def test_generate_prompt_argument_streams_tokens(split_dir, capsys):
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[0]
    assert (
        main(["generate", str(shards), prompt, "--max-new-tokens", "8", "--device", "cpu", "--max-memory", "cpu=0"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    assert out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 8).strip()


def test_generate_with_a_draft_of_another_vocabulary_size(split_dir, tmp_path, capsys):
    """A draft whose vocabulary size differs (e.g. a padded embedding) runs through universal assisted decoding,
    which needs both tokenizers: the output is the greedy one."""
    ckpt, shards = split_dir
    draft = _models.save_tiny_checkpoint(
        _models.make_config("llama", num_hidden_layers=1, vocab_size=136), tmp_path / "draft"
    )
    prompt = _models.SAMPLE_PROMPTS[1]
    argv = ["generate", str(shards), prompt, "--assistant", str(draft), "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    assert out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 8).strip()


def test_generate_prompt_from_stdin(split_dir, capsys, monkeypatch):
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))  # (`echo PROMPT |`: the newline is not the prompt's)
    assert main(["generate", str(shards), "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 5).strip()


def test_generate_from_a_jsonl_file_prints_its_profile(split_dir, tmp_path, capsys):
    _, shards = split_dir
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--max-new-tokens", "2", "--device", "cpu", "--profile"]) == 0
    err = capsys.readouterr().err
    assert '"generated": 1' in err and "layer" in err.split('"generated": 1', 1)[1]


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{shards}", "hi", "--dtype", "bf16"], "unknown dtype 'bf16'"),
        (["inspect", "{shards}", "--max-memory", "cpu16GiB"], "--max-memory item 'cpu16GiB' must look like"),
        (["split", "{ckpt}", "{tmp}/out", "--dtype", "fp16"], "`dtype` 'fp16' is not a torch dtype name"),
        (["generate", "{shards}", "hi", "--assistant", "{ckpt}", "--prompt-lookup", "3"], "either `--assistant` or"),
        (["generate", "{shards}", "hi", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/o"], "either a PROMPT or"),
        (["generate", "{shards}", "hi", "--prompt-lookup", "0"], "`--prompt-lookup` must be a positive"),
    ],
    ids=["generate-dtype", "inspect-max-memory", "split-dtype", "assistant-and-lookup", "prompt-and-input", "lookup-0"],
)
def test_bad_option_values_are_clear_errors(split_dir, tmp_path, capsys, argv, message):
    """A misspelled value fails with the CLI's one-line error and exit status 2, not a traceback (or, for split's
    dtype, silently not casting)."""
    ckpt, shards = split_dir
    argv = [a.format(shards=shards, ckpt=ckpt, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_trailing_comma_in_max_memory_is_harmless(split_dir, capsys):
    _, shards = split_dir
    assert main(["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0,"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["streamed"] == [0, 1, 2]


def test_inspect_and_verify(split_dir, capsys):
    _, shards = split_dir
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "compression      none" in out
    assert main(["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 3 and info["plan"]["streamed"] == [0, 1, 2]
    assert info["plan"]["page_cache_layers"] == [0, 1, 2]  # auto: the tiny model fits
    for choice, expected in (("drop", []), ("keep", [0, 1, 2])):
        argv = ["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0", "--page-cache", choice]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["plan"]["page_cache_layers"] == expected
    # `--dtype`: the plan counts the resident parts and the layers at that dtype (this checkpoint is float32)
    plans = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["inspect", str(shards), "--json", "--device", "cpu", "--dtype", dtype]) == 0
        plans[dtype] = json.loads(capsys.readouterr().out)["plan"]
    for key in ("resident_bytes", "layer_bytes"):
        half = [b // 2 for b in plans["float32"][key]] if key == "layer_bytes" else plans["float32"][key] // 2
        assert plans["bfloat16"][key] == half, key
    assert main(["verify", str(shards)]) == 0
    assert "all 4 files match" in capsys.readouterr().out


def test_verify_reports_corruption(split_dir, tmp_path, capsys):
    import shutil

    _, shards = split_dir
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert main(["verify", str(copy), "--quick"]) == 0
    capsys.readouterr()
    victim = copy / "layers" / "00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    report = capsys.readouterr().out
    assert "layers/00002.safetensors" in report and "00001.safetensors" not in report


def test_demo_runs_and_agrees(tmp_path):
    """The main job on the built-in default, shrunk: streamed and in-memory runs must produce the same tokens."""
    cmd = [
        sys.executable,
        "-m",
        "hf_layerstream",
        "demo",
        "--dir",
        str(tmp_path),
        "--layers",
        "2",
        "--hidden-size",
        "64",
        "--intermediate-size",
        "128",
        "--vocab-size",
        "256",
        "--max-new-tokens",
        "4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "streamed output equals the whole model's: yes" in out.stdout
    assert "peak RSS" in out.stdout and "s/token" in out.stdout
    assert (tmp_path / "shards" / "manifest.json").exists()
    assert torch.__version__  # the demo ran with this interpreter's torch


def test_demo_runs_both_systems_on_one_device(tmp_path, monkeypatch, capsys):
    """The whole model and the streamed one are compared on the same device, and the default budget streams every
    layer there (on a GPU: `0=0,cpu=0`; the reference ran on the CPU and the streamed model kept every layer on the
    GPU before). What each child process is asked to do, as `run_demo` builds it."""
    import hf_layerstream._measure as measure
    from hf_layerstream import engine

    specs = []

    def fake_child(spec):
        specs.append(dict(spec))
        return {"tokens": [1, 2, 3], "s_per_token": 0.1, "peak_rss": 2**20}

    monkeypatch.setattr(measure, "run_child", fake_child)
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    assert main(["demo", "--dir", str(tmp_path), *tiny, "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert [s["device"] for s in specs] == ["cpu", "cpu"]
    assert specs[1]["max_memory"] == {"cpu": "0"}
    # a GPU machine (this one has none: the device check is what says so)
    specs.clear()
    monkeypatch.setattr(engine, "check_device", lambda device: torch.device("cuda", 0))
    assert main(["demo", "--dir", str(tmp_path), *tiny, "--max-new-tokens", "3"]) == 0
    assert [s["device"] for s in specs] == ["cuda:0", "cuda:0"]
    assert specs[1]["max_memory"] == {0: "0", "cpu": "0"}
    assert "streamed (max_memory=0=0,cpu=0)" in capsys.readouterr().out
