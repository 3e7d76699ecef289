"""The `hf-layerstream` console script: split, generate (argument and stdin), inspect, verify, demo, --help."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import _models
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from hf_layerstream.cli import build_parser, main
from hf_layerstream.engine import size_text
from hf_layerstream.errors import ShardFileError
from hf_layerstream.shard_dir import ShardDirectory

COMMANDS = ["split", "generate", "demo", "inspect", "verify"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"hf-layerstream {command}" in out
    # (an install command that works: hf_layerstream is not on PyPI, so `pip install hf_layerstream[peft]` failed)
    assert "pip install hf_layerstream" not in " ".join(out.split())


@pytest.mark.parametrize("command", [*COMMANDS, "bench"])
def test_every_option_of_each_command_is_described_in_its_help(command):
    """The README says `hf-layerstream COMMAND --help` documents each command; `generate --help` listed
    `--temperature` and `--top-p`, and `demo --help` `--prefetch`, with no word of what they do or default to."""
    from hf_layerstream.cli import _command_parser

    sub = _command_parser(build_parser(), command)
    assert [a.dest for a in sub._actions if a.help is None] == []


def test_console_script_is_installed():
    out = subprocess.run(["hf-layerstream", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


def test_the_cli_imports_nothing_heavy_before_a_command_runs_and_ctrl_c_there_is_handled(tmp_path):
    """`import hf_layerstream` imported torch and transformers (every public name, eagerly), so `hf-layerstream
    --help` took seconds and Ctrl-C while a command started printed an import traceback. The package's names are
    imported when first used now (PEP 562), and a Ctrl-C during a command's imports is "interrupted", exit 130."""
    script = (
        "import sys\n"
        "import hf_layerstream.cli\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'huggingface_hub') if m in sys.modules))\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('torch', 'transformers'):\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.exit(hf_layerstream.cli.main(['verify', sys.argv[1]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout, out.stderr) == (130, "[]\n", "interrupted\n")


def test_the_submodules_are_attributes_of_the_package_after_a_plain_import():
    """`import hf_layerstream` made its submodules attributes of the package (the names were imported eagerly), and
    code reads them so (`hf_layerstream.errors.ShardDirError`): imported when first used now, they still are."""
    script = (
        "import hf_layerstream\n"
        "print(hf_layerstream.errors.ShardDirError.__name__, hf_layerstream.stream.__name__)\n"
        "print(hasattr(hf_layerstream, 'no_such_module'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout) == (0, "ShardDirError hf_layerstream.stream\nFalse\n"), out.stderr


def test_every_public_name_is_there_when_first_used():
    import hf_layerstream

    for name in hf_layerstream.__all__:
        assert getattr(hf_layerstream, name) is not None and name in dir(hf_layerstream)
    from hf_layerstream import ShardDirError, enable_layer_streaming, errors, stream

    assert (ShardDirError, enable_layer_streaming) == (errors.ShardDirError, stream.enable_layer_streaming)
    with pytest.raises(ImportError, match="cannot import name 'enable_streaming'"):
        from hf_layerstream import enable_streaming  # noqa: F401


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


def test_a_chat_reply_goes_on_a_line_of_its_own(split_dir, capsys, tmp_path):
    """With `--chat` the model answers the prompt rather than continuing it: the reply was printed right after the
    echoed prompt ("Tell meafafaf"). It goes on the next line now, and is the loaded model's reply to the templated
    prompt."""
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[0]
    assert main(["generate", str(shards), prompt, "--chat", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt + "\n")
    tok = AutoTokenizer.from_pretrained(ckpt)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ref = _models.load_reference(ckpt, attn_implementation=None)
    ids = ref.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, inputs["input_ids"].shape[1] :]
    assert out[len(prompt) + 1 :].strip() == tok.decode(ids, skip_special_tokens=True).strip() != ""
    # a tokenizer without a chat template: the prompt is used as it is, and the text continues it, as without --chat
    plain = tmp_path / "plain-tokenizer"
    plain.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, plain / name)
    args = ["generate", str(shards), prompt, "--max-new-tokens", "4", "--device", "cpu", "--tokenizer", str(plain)]
    assert main([*args, "--chat"]) == 0
    chatted = capsys.readouterr().out
    assert main(args) == 0
    assert chatted == capsys.readouterr().out and not chatted.startswith(prompt + "\n")


@pytest.mark.parametrize(
    "template, message",
    [
        (
            "{{ raise_exception('Only system and user roles are supported') }}",
            "Only system and user roles are supported",
        ),
        ("{{ messages | nosuchfilter }}", "No filter named 'nosuchfilter'"),
    ],
    ids=["raises", "does-not-parse"],
)
def test_a_chat_template_that_fails_is_a_one_line_error(split_dir, tmp_path, capsys, template, message):
    """`--chat` with a chat template that refuses the conversation (its `raise_exception(...)`) or does not parse
    ended in jinja2's traceback. One line now (exit 2), naming the tokenizer and the template's own message, with
    nothing printed on standard output."""
    ckpt, shards = split_dir
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tokenizer / name)
    (tokenizer / "chat_template.jinja").write_text(template)
    argv = ["generate", str(shards), "hi", "--chat", "--tokenizer", str(tokenizer), "--max-new-tokens", "2"]
    assert main([*argv, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"hf-layerstream generate: error: The chat template of `--tokenizer` {tokenizer} failed ")
    assert message in err


def test_a_chat_template_that_makes_no_tokens_is_a_one_line_error(split_dir, tmp_path, capsys):
    """A prompt of no tokens (a chat template that renders nothing, a tokenizer that adds no BOS) went to the model and
    ended in torch's traceback ("cannot reshape tensor of 0 elements"). One line now (exit 2), before anything is
    printed."""
    ckpt, shards = split_dir
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tokenizer / name)
    (tokenizer / "chat_template.jinja").write_text("{{ '' }}")
    argv = ["generate", str(shards), "hi", "--chat", "--tokenizer", str(tokenizer), "--max-new-tokens", "2"]
    assert main([*argv, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"hf-layerstream generate: error: The chat template of `--tokenizer` {tokenizer} made no tokens of the prompt: "
        "drop `--chat`, or pass a tokenizer whose template works with `--tokenizer`.\n"
    )


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


def test_generate_takes_the_prompt_as_an_option_too(split_dir, capsys):
    """`--prompt TEXT`, as other LLM command lines take it: argparse read it as an abbreviation of `--prompt-lookup`
    and refused TEXT ("argument --prompt-lookup: invalid int value"). A prompt given both ways is refused."""
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[0]
    assert main(["generate", str(shards), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 8).strip()
    with pytest.raises(SystemExit) as caught:
        main(["generate", str(shards), "other", "--prompt", prompt, "--device", "cpu"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "hf-layerstream generate: error: the prompt is given twice" in err, err
    assert err.startswith("usage: hf-layerstream generate ")  # (its usage, not the top-level one's)


def test_generate_prints_the_space_before_the_first_new_word(split_dir, tmp_path, capsys):
    """With a SentencePiece tokenizer, the new tokens decoded on their own lose the first one's leading space: the
    first word was printed glued to the prompt. What is printed is the whole sequence, decoded."""
    ckpt, shards = split_dir
    tokenizer = _models.save_metaspace_tokenizer(tmp_path / "tokenizer")
    argv = ["generate", str(shards), "is it", "--tokenizer", str(tokenizer), "--max-new-tokens", "4"]
    assert main([*argv, "--device", "cpu", "--max-memory", "cpu=0"]) == 0
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ref = _models.load_reference(ckpt, attn_implementation=None)
    out = ref.generate(**tok("is it", return_tensors="pt"), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tok.convert_ids_to_tokens(out[0, -4:])[0].startswith("▁")  # (the premise: the first new word after a space)
    assert capsys.readouterr().out == tok.decode(out[0], skip_special_tokens=True) + "\n"


def test_the_streamer_keeps_the_space_that_begins_a_line(capsys):
    """What `generate` prints equals the whole sequence decoded, past the prompt, where a line begins with a space
    (an indentation; SentencePiece writes it into the next word's piece): transformers before 5.25 emptied the
    streamer's cache after a newline, so the next piece was decoded alone and its space dropped."""
    import string

    from transformers import LlamaTokenizer

    from hf_layerstream.cli import _continuation_streamer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "\n": 4} | {
        c: 5 + i for i, c in enumerate(string.ascii_lowercase)
    }
    vocab |= {"▁" + c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)}
    tok = LlamaTokenizer(vocab=vocab, merges=[("▁", c) for c in string.ascii_lowercase])
    prompt, text = tok("is it")["input_ids"], "is it\n a b\n  c\nd"
    ids = tok(text)["input_ids"]
    assert ids[: len(prompt)] == prompt and tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[len(prompt) + 1])[0] == "▁"  # (the premise: a line that begins with ▁a)
    streamer = _continuation_streamer(tok, prompt, skip_special_tokens=True)
    capsys.readouterr()
    streamer.put(torch.tensor([prompt]))
    for token in ids[len(prompt) :]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert capsys.readouterr().out == text[len("is it") :] + "\n"


@pytest.mark.parametrize("prompt", [_models.SAMPLE_PROMPTS[1], "I"], ids=["sentence", "one-token"])
def test_generate_with_a_draft_of_another_vocabulary_size(split_dir, tmp_path, capsys, prompt):
    """A draft whose vocabulary size differs (e.g. a padded embedding) runs through universal assisted decoding,
    which needs both tokenizers: the output is the greedy one. There the draft keeps transformers' confidence
    threshold (with `configure_draft`'s 0, a one-token prompt crashed inside transformers' translation)."""
    ckpt, shards = split_dir
    draft = _models.save_tiny_checkpoint(
        _models.make_config("llama", num_hidden_layers=1, vocab_size=136), tmp_path / "draft"
    )
    argv = ["generate", str(shards), prompt, "--assistant", str(draft), "--max-new-tokens", "8", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    assert out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 8).strip()


def test_sampling_with_a_draft_of_a_padded_vocabulary_is_refused_before_generating(split_dir, tmp_path, capsys):
    """A draft of the model's tokenizer with a padded vocabulary (Qwen2.5-0.5B for Qwen2.5-7B) goes through universal
    assisted decoding, which, sampling, failed inside transformers on its first draft ("'AssistantToTargetTranslator'
    object has no attribute 'assistant_overlap_token_ids'", a traceback). Refused before anything is printed, naming
    the options; greedy, it runs."""
    ckpt, shards = split_dir
    draft = _models.save_tiny_checkpoint(
        _models.make_config("llama", num_hidden_layers=1, vocab_size=136), tmp_path / "draft"
    )
    argv = ["generate", str(shards), "Hello", "--assistant", str(draft), "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*argv, "--do-sample", "--seed", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "`--do-sample` with a draft (`--assistant`) whose vocabulary size differs" in captured.err
    assert "'assistant_overlap_token_ids'" in captured.err and "Traceback" not in captured.err
    assert main(argv) == 0


def test_a_shard_directory_without_a_tokenizer_names_the_option_to_give_one(split_dir, tmp_path, capsys):
    """A shard directory split from a checkpoint without tokenizer files: `generate` says so and names `--tokenizer`
    (transformers' own error spoke of converting a slow tokenizer); with `--tokenizer` it runs."""
    ckpt, shards = split_dir
    bare = tmp_path / "shards"
    shutil.copytree(shards, bare)
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    for name in names:
        (bare / name).unlink(missing_ok=True)
    # (as such a split's manifest lists them: not at all; one it lists that is gone is named as missing)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["side_files"] = [name for name in manifest["side_files"] if name not in names]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", str(bare), "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"The shard directory {bare} holds no tokenizer that loads" in err
    assert err.rstrip().endswith("give one with `--tokenizer` (a folder or a hub id).")
    assert (
        main(["generate", str(bare), "hi", "--max-new-tokens", "2", "--device", "cpu", "--tokenizer", str(ckpt)]) == 0
    )


def test_an_error_from_generate_goes_on_a_line_of_its_own(split_dir, capsys, monkeypatch):
    """The prompt is printed before `generate` runs; an error it raises then is told on a line of its own, not glued
    to the prompt ("hihf-layerstream generate: error: ...")."""
    from transformers.generation.utils import GenerationMixin

    def failing(self, *args, **kwargs):
        raise ValueError("a check of transformers' failed")

    monkeypatch.setattr(GenerationMixin, "generate", failing)
    _, shards = split_dir
    assert main(["generate", str(shards), "hi", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "hi\n"
    assert err == "hf-layerstream generate: error: a check of transformers' failed\n"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--temperature", "0"], "`--temperature` (=0.0) has to be a strictly positive number"),
        (["--temperature", "-1"], "`--temperature` (=-1.0) has to be a strictly positive number"),
        (["--top-p", "1.5"], "`--top-p` (=1.5) has to be a number from 0 to 1"),
        (["--top-p", "nan"], "`--top-p` (=nan) has to be a number from 0 to 1"),
        (["--temperature", "nan"], "`--temperature` (=nan) has to be a strictly positive number"),
        (["--temperature", "inf"], "`--temperature` (=inf) has to be a finite number"),
        (["--temperature", "1e309"], "`--temperature` (=inf) has to be a finite number"),
    ],
)
def test_sampling_settings_transformers_refuses_are_refused_before_anything_is_printed(
    split_dir, capsys, options, message
):
    """transformers checks the sampling settings once `generate` has begun: the prompt was printed, then the error
    (after the model had loaded). Refused first now, with nothing on standard output; without `--do-sample` they are
    not used (transformers warns that they are ignored), and not refused. An infinite temperature, which transformers
    takes, sampled every token alike whatever the model (logits divided by it are all 0): refused too."""
    _, shards = split_dir
    assert main(["generate", str(shards), "hi", "--do-sample", "--device", "cpu", *options]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"hf-layerstream generate: error: {message}"), err
    assert main(["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu", *options]) == 0
    assert capsys.readouterr().out.startswith("hi")


@pytest.mark.parametrize("job", [False, True], ids=["prompt", "input"])
def test_a_temperature_too_small_to_divide_by_is_a_one_line_error(split_dir, tmp_path, capsys, job):
    """`--do-sample --temperature 1e-300`: the logits divided by it overflow float32 (inf, NaN), and sampling ended in
    torch's traceback, "probability tensor contains either `inf`, `nan` or element < 0", naming no option. One line
    now, naming `--temperature`, its value and the fix; a larger one then runs (with `--input`: nothing was written,
    so the same job goes on with it)."""
    _, shards = split_dir
    argv = ["generate", str(shards), "--do-sample", "--max-new-tokens", "2", "--device", "cpu", "--seed", "0"]
    if job:
        (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
        argv += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    else:
        argv.append("hi")
    assert main([*argv, "--temperature", "1e-300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-layerstream generate: error: `--temperature` 1e-300 is too small") and "\n" not in err
    assert "Pass a larger one" in err and "`--do-sample`" in err, err
    assert main([*argv, "--temperature", "0.5"]) == 0


def test_top_p_is_checked_as_transformers_checks_it(split_dir, capsys):
    """`--top-p` is refused before the model loads exactly where transformers' `TopPLogitsWarper` refuses it (below 0
    or above 1: its message says "> 0 and < 1", its check takes both ends), so a value transformers takes is never
    refused, nor one it refuses met only once the prompt is printed. `--top-p 0` keeps the most probable token alone
    (the warper keeps one token at least): sampling then gives the greedy text."""
    from transformers.generation.logits_process import TopPLogitsWarper

    ckpt, shards = split_dir
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "3", "--device", "cpu", "--do-sample", "--top-p"]
    for value in ("-0.01", "1.01"):
        with pytest.raises(ValueError, match="top_p"):
            TopPLogitsWarper(float(value))
        assert main([*argv, value]) == 2
        out, err = capsys.readouterr()
        assert out == "" and f"`--top-p` (={float(value)}) has to be a number from 0 to 1" in err, err
    TopPLogitsWarper(1.0)  # (taken, as 0 is)
    assert main([*argv, "1", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    TopPLogitsWarper(0.0)
    for seed in ("1", "2"):
        assert main([*argv, "0", "--seed", seed]) == 0
        assert capsys.readouterr().out[2:].strip() == _greedy_text(ckpt, "hi", 3).strip()


def test_generate_checks_the_seed_as_the_batch_api_does(split_dir, capsys, monkeypatch):
    """`--seed`'s range (`torch.manual_seed`'s) was checked in the command beside `batch._check_seed`, the same numbers
    written twice. The command asks `_check_seed`, naming `--seed`, before the model loads."""
    from hf_layerstream import batch, cli

    ckpt, shards = split_dir
    real, seen = batch._check_seed, []
    monkeypatch.setattr(batch, "_check_seed", lambda seed, name="seed": seen.append((seed, name)) or real(seed, name))
    monkeypatch.setattr(cli, "load_streamed_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for seed in (2**64, -(2**63) - 1):
        assert main(["generate", str(shards), "hi", "--do-sample", "--seed", str(seed)]) == 2
        err = capsys.readouterr().err
        assert f"`--seed` {seed} is out of range: use a whole number from {-(2**63)} to {2**64 - 1}." in err, err
    assert seen == [(2**64, "--seed"), (-(2**63) - 1, "--seed")]


def test_a_seed_without_sampling_is_warned_about(split_dir, capsys):
    """`--seed` without `--do-sample` did nothing, without a word (greedy decoding draws no random numbers, and
    transformers, which warns of `--temperature` unused, never sees the seed): a line on standard error says so; the
    text is the greedy one, and with `--do-sample` there is no such line."""
    ckpt, shards = split_dir
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu", "--seed", "7"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "`--seed` 7 is ignored without `--do-sample`" in err and "pass `--do-sample` to sample" in err, err
    assert out.startswith("hi") and out[2:].strip() == _greedy_text(ckpt, "hi", 2).strip()
    assert main([*argv, "--do-sample"]) == 0
    assert "--seed" not in capsys.readouterr().err


@pytest.mark.parametrize("job", [False, True], ids=["prompt", "input"])
def test_sampling_options_without_sampling_are_warned_about_once(split_dir, tmp_path, capsys, job):
    """`--temperature` and `--top-p` without `--do-sample` did nothing: the text was the greedy one, and the user got
    only transformers' generic "The following generation flags are not valid and may be ignored: ['temperature',
    'top_p']", once the prompt was printed (and a line of ours for `--seed`, apart). One line of the command's now,
    before generating, naming each option given, that it applies only with `--do-sample`, and that decoding is
    greedy (the generation config asks for no beams); transformers' own for those flags is not printed during the
    command, and printed again after it."""
    from transformers.generation import GenerationConfig

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    flags = logging.getLogger("transformers.generation.configuration_utils")
    flags.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # (transformers says each message once a process)
    ckpt, shards = split_dir
    argv = ["generate", str(shards), "--max-new-tokens", "2", "--device", "cpu"]
    if job:
        (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
        argv += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    else:
        argv.append("hi")
    try:
        assert main([*argv, "--temperature", "0.5", "--top-p", "0.9", "--seed", "3"]) == 0
        out, err = capsys.readouterr()
        ours = [line for line in err.splitlines() if "--do-sample" in line]
        assert ours == [
            "hf-layerstream generate: `--temperature` 0.5, `--top-p` 0.9 and `--seed` 3 are ignored without "
            "`--do-sample`: they apply only to sampling, and decoding is greedy; pass `--do-sample` to sample."
        ], err
        assert not [r for r in records if "not valid and may be ignored" in r.getMessage()], records
        if job:
            out = json.loads((tmp_path / "out.jsonl").read_text())["completion"]
            assert out.strip() == _greedy_text(ckpt, "hi", 2).strip()
            # (ignored, they are no setting of the job: it resumes without them, as it would without `--seed`)
            (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "yo"}\n')
            assert main(argv) == 0
            assert json.loads(capsys.readouterr().err.splitlines()[-1])["skipped"] == 1
        else:
            assert out.startswith("hi") and out[2:].strip() == _greedy_text(ckpt, "hi", 2).strip()
            assert main([*argv, "--top-p", "0.9"]) == 0
            err = capsys.readouterr().err
            assert (
                "hf-layerstream generate: `--top-p` 0.9 is ignored without `--do-sample`: it applies only to "
                "sampling, and decoding is greedy; pass `--do-sample` to sample." in err
            ), err
            assert main([*argv, "--top-p", "0.9", "--do-sample", "--seed", "0"]) == 0
            assert "--do-sample" not in capsys.readouterr().err
        GenerationConfig(do_sample=False, temperature=0.5).validate()  # (outside the command: transformers' own)
        assert [r for r in records if "not valid and may be ignored: ['temperature']" in r.getMessage()], records
    finally:
        flags.removeHandler(handler)


def test_transformers_flags_warning_is_left_out_for_the_options_the_command_warns_of(monkeypatch):
    """`generate` leaves out transformers' "The following generation flags are not valid and may be ignored: [...]"
    where it says itself which sampling options go unused: its list of the flags to leave out (temperature, top_p)
    was a second copy of the options `_sampling_options_unused` knows. The flags left out are those it names."""
    from transformers.generation import GenerationConfig

    from hf_layerstream import cli

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    flags = logging.getLogger("transformers.generation.configuration_utils")

    def generate(args):
        logging.Logger.warning_once.cache_clear()  # (transformers says each message once a process)
        GenerationConfig(do_sample=False, temperature=0.5, top_p=0.9).validate()
        return 0

    monkeypatch.setattr(cli, "_generate", generate)
    args = build_parser().parse_args(["generate", "shards", "hi", "--temperature", "0.5", "--top-p", "0.9"])
    flags.addHandler(handler)
    try:
        for unused, printed in ((["temperature", "top_p"], False), (["temperature"], True), ([], True)):
            monkeypatch.setattr(cli, "_sampling_options_unused", lambda args, unused=unused: unused)
            records.clear()
            assert cli._cmd_generate(args) == 0
            said = [r for r in records if "not valid and may be ignored" in r.getMessage()]
            assert bool(said) == printed, (unused, said)
    finally:
        flags.removeHandler(handler)


def test_a_generation_past_a_learned_position_table_is_refused_before_it_starts(tmp_path, capsys):
    """GPT-2 has a learned table of 256 positions here (`n_positions`): a prompt and `--max-new-tokens` past it ran
    until the table ran out, then ended in a torch traceback (`IndexError: index out of range in self`, the loaded
    model's too). Refused first, naming both numbers and the fix; up to the table's end it generates; a rotary model
    (Llama) has no table, and is not held to `max_position_embeddings`."""
    ckpt = _models.save_tiny_checkpoint("gpt2", tmp_path / "gpt2")
    shards = tmp_path / "shards"
    assert main(["split", str(ckpt), str(shards), "--quiet"]) == 0
    capsys.readouterr()
    prompt_tokens = len(AutoTokenizer.from_pretrained(ckpt)("hello there").input_ids)
    room = 257 - prompt_tokens  # (the last new token is not run through the model: it needs no position)
    args = ["generate", str(shards), "hello there", "--device", "cpu", "--max-new-tokens"]
    assert main([*args, str(room + 1)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"hf-layerstream generate: error: The prompt ({prompt_tokens} tokens) and `--max-new-tokens` {room + 1} run "
        f"past the 256 positions of GPT2LMHeadModel's learned position table (`max_position_embeddings`): pass "
        f"`--max-new-tokens` {room} or less, or a shorter prompt.\n"
    )
    assert main([*args, str(room)]) == 0  # (random weights: it may stop early at its end-of-sequence token)
    assert capsys.readouterr().out.startswith("hello there")

    llama = _models.save_tiny_checkpoint("llama", tmp_path / "llama")
    assert main(["split", str(llama), str(tmp_path / "llama-shards"), "--quiet"]) == 0
    capsys.readouterr()
    long = ["generate", str(tmp_path / "llama-shards"), "hello there", "--device", "cpu", "--max-new-tokens", "300"]
    assert AutoConfig.from_pretrained(llama).max_position_embeddings == 256
    assert main(long) == 0


def test_a_default_max_new_tokens_past_a_learned_position_table_is_named_as_the_default(tmp_path, capsys):
    """A GPT-2 prompt whose room in the position table is under the 64 new tokens `generate` makes by default was
    refused naming "`--max-new-tokens` 64", an option the user never gave. The refusal says it is the default; one
    given is named as before."""
    ckpt = _models.save_tiny_checkpoint("gpt2", tmp_path / "gpt2")
    shards = tmp_path / "shards"
    assert main(["split", str(ckpt), str(shards), "--quiet"]) == 0
    capsys.readouterr()
    prompt = " ".join(["hello"] * 45)
    n = len(AutoTokenizer.from_pretrained(ckpt)(prompt).input_ids)
    assert 257 - n < 64  # (the premise: the default does not fit)
    argv = ["generate", str(shards), prompt, "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"The prompt ({n} tokens) and `--max-new-tokens` 64 (its default) run past the 256 positions" in err, err
    assert f"pass `--max-new-tokens` {257 - n} or less, or a shorter prompt." in err
    assert main([*argv, "--max-new-tokens", "64"]) == 2
    assert f"The prompt ({n} tokens) and `--max-new-tokens` 64 run past" in capsys.readouterr().err
    # a job (`--input`): its refusal, `generate_jsonl`'s, says so too
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": prompt}) + "\n")
    job = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*job, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"Prompt 'a' ({n} tokens) and `--max-new-tokens` 64 (its default) run past the 256 positions" in err, err
    assert main([*job, "--device", "cpu", "--max-new-tokens", "64"]) == 2
    assert f"Prompt 'a' ({n} tokens) and `--max-new-tokens` 64 run past" in capsys.readouterr().err


def test_ctrl_c_during_generate_goes_on_a_line_of_its_own(split_dir, capsys, monkeypatch):
    """Ctrl-C while the text is printed: "interrupted" (exit 130) on a line of its own, as an error is."""
    from transformers.generation.utils import GenerationMixin

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GenerationMixin, "generate", interrupted)
    _, shards = split_dir
    assert main(["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 130
    out, err = capsys.readouterr()
    assert out == "hi\n" and err == "interrupted\n"


@pytest.mark.parametrize("error", ["gpu", "cpu", "loader"])
def test_generate_out_of_memory_is_a_one_line_error(split_dir, capsys, monkeypatch, error):
    """Out of memory while a single prompt generates (a GPU's `torch.OutOfMemoryError`, the CPU allocator's
    `RuntimeError`, a `MemoryError` the loader raised reading a layer) ended in torch's traceback, where `--input`
    said it in one line. One line now (exit 2), on a line of its own after the text printed, naming what to lower."""
    from hf_layerstream.engine import LayerLoader

    _, shards = split_dir
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu"]
    if error == "loader":

        def populate_fails(self, index, *_):
            raise MemoryError("Out of memory reading 00000.safetensors (1 MiB) into memory")

        monkeypatch.setattr(LayerLoader, "_load_streamed", populate_fails)
        argv += ["--max-memory", "cpu=0", "--prefetch", "0"]
    else:
        from transformers.generation.utils import GenerationMixin

        def generate(self, *args, **kwargs):
            if error == "gpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")

        monkeypatch.setattr(GenerationMixin, "generate", generate)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "hi\n"
    assert err.startswith("hf-layerstream generate: error: Out of memory generating (") and err.count("\n") == 1, err
    assert "`--max-memory`" in err and "`--max-new-tokens`" in err


def test_a_tokenizer_of_a_larger_vocabulary_is_refused_in_one_line(split_dir, tmp_path, capsys):
    """A `--tokenizer` of another model, whose ids for the prompt run past this model's embedding table, ended in
    torch's traceback ("IndexError: index out of range in self"; on a GPU, a device-side assert). Refused in one line
    now, before anything is printed, naming the option; a prompt within the vocabulary still generates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, shards = split_dir
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # (256 byte tokens: past the 128 of the tiny model)
    backend.train_from_iterator(["hi"], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "other")
    argv = ["generate", str(shards), "--tokenizer", str(tmp_path / "other"), "--max-new-tokens", "2", "--device", "cpu"]
    other = AutoTokenizer.from_pretrained(tmp_path / "other")
    assert max(other("中文").input_ids) >= 128 > max(other("!").input_ids)  # (the premise)
    assert main([*argv, "中文"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("hf-layerstream generate: error: The prompt holds token id ")
    assert f"past the 128 tokens of the model's vocabulary: `--tokenizer` {tmp_path / 'other'} is not this" in err
    assert main([*argv, "!"]) == 0 and capsys.readouterr().out.startswith("!")
    # a job of prompts (`--input`, `generate_jsonl`) alike, naming the prompt
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "!"}\n{"id": 2, "prompt": "中文"}\n')
    assert main([*argv, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: Prompt 2 holds token id " in err, err
    assert "past the 128 tokens of LlamaForCausalLM's vocabulary: the tokenizer is not this model's" in err
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_generate_to_a_stdout_that_cannot_encode_the_text_escapes_it(split_dir, capsys, monkeypatch, encoding):
    """Standard output in an encoding other than UTF-8 (a Latin-1 locale, `PYTHONIOENCODING=ascii`, a file on
    Windows): the first character it cannot encode (a curly quote, CJK, an emoji: of the prompt echoed, or of the
    text the model writes) ended the command part way ("error: 'latin-1' codec can't encode character '\\u201c'",
    exit 2). Written as Python's escapes now, the rest as it is, and the text goes on."""
    ckpt, shards = split_dir
    stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    monkeypatch.setattr(sys, "stdout", stdout)
    prompt = "caf\u00e9 \u201cquoted\u201d"
    assert main(["generate", str(shards), prompt, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    stdout.flush()
    out = stdout.buffer.getvalue().decode(encoding)
    escaped = "caf\\xe9" if encoding == "ascii" else "caf\u00e9"
    head = escaped + " \\u201cquoted\\u201d"
    assert out.startswith(head), out
    assert out[len(head) :].strip() == _greedy_text(ckpt, prompt, 4).strip() != ""
    assert capsys.readouterr().err == ""


def test_standard_output_on_a_full_disk_is_named(split_dir, monkeypatch, capsys):
    """Standard output redirected to a full disk (`> /dev/full`): the command ended with "error: [Errno 28] No space
    left on device", naming no file (the shard directory's disk, the reader would think). The error names standard
    output, with the fix; `generate`'s streamed text and `inspect`'s table alike."""
    import errno

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _, shards = split_dir
    for argv in (["inspect", str(shards), "--device", "cpu"], ["generate", str(shards), "Hi", "--max-new-tokens", "2"]):
        monkeypatch.setattr(sys, "stdout", Full())
        assert main([*argv, "--device", "cpu"] if argv[0] == "generate" else argv) == 2
        err = capsys.readouterr().err
        assert (
            f"hf-layerstream {argv[0]}: error: cannot write standard output ([Errno 28] No space left on device)" in err
        )
        assert "free space on the disk it is redirected to, or redirect it elsewhere" in err


def test_verify_and_inspect_of_a_path_stdout_cannot_encode_escape_it(split_dir, tmp_path, monkeypatch, capsys):
    """`verify` of a sound directory whose path standard output cannot encode (`PYTHONIOENCODING=ascii`) ended with
    "error: 'ascii' codec can't encode character" (exit 2), as `generate` did for a model's text: every command's
    standard output writes such characters as Python's escapes."""
    import shutil

    _, shards = split_dir
    copy = shutil.copytree(shards, tmp_path / "caf\u00e9.layers")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["verify", str(copy)]) == 0
    assert main(["inspect", str(copy), "--device", "cpu"]) == 0
    stdout.flush()
    out = stdout.buffer.getvalue().decode("ascii")
    assert "caf\\xe9.layers" in out and "all 4 files match" in out and "per layer" in out
    assert "error" not in capsys.readouterr().err


def test_generate_prompt_from_stdin(split_dir, capsys, monkeypatch):
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))  # (`echo PROMPT |`: the newline is not the prompt's)
    assert main(["generate", str(shards), "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 5).strip()


@pytest.mark.parametrize(
    "argv",
    [["-", "--max-new-tokens", "3"], ["--max-new-tokens", "3", "-"], ["--prompt", "-", "--max-new-tokens", "3"]],
    ids=["first", "after-the-options", "prompt-option"],
)
def test_a_dash_prompt_reads_standard_input(split_dir, capsys, monkeypatch, argv):
    """`generate SHARD_DIR -` took "-" as the prompt's text: it reads the prompt from standard input now, as `--input -`
    reads the prompts and as most commands read a file named "-"; so does `--prompt -`. With `--input` it is still a
    PROMPT given beside it, refused."""
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))
    assert main(["generate", str(shards), "--device", "cpu", *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 3).strip(), out
    assert main(["generate", str(shards), "-", "--input", "-", "--output", "out.jsonl"]) == 2
    assert "Pass either a PROMPT or `--input`" in capsys.readouterr().err


def test_a_prompt_from_stdin_loses_only_the_newline_that_ends_it(split_dir, capsys, monkeypatch):
    """Every newline at the end of the text piped in was dropped (`rstrip`): a prompt ending in a blank line, for the
    model to go on after it, lost it. Only the one that ends the text (`echo`'s, a file's last line's; CRLF too) is
    dropped now."""
    ckpt, shards = split_dir
    prompt = _models.SAMPLE_PROMPTS[1] + "\n"
    for piped in (prompt + "\n", prompt + "\r\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        assert main(["generate", str(shards), "--max-new-tokens", "3", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(prompt) and out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 3).strip(), piped
    assert _greedy_text(ckpt, prompt, 3) != _greedy_text(ckpt, prompt.rstrip(), 3)  # (the newline is seen)


@pytest.mark.parametrize("where", ["stdin", "argument"])
def test_generate_refuses_a_prompt_that_is_not_utf8(split_dir, capsys, monkeypatch, where):
    """Bytes that are not UTF-8 (a Latin-1 file piped in) reach Python as lone surrogates (`surrogateescape`, as
    for stdin and argv under a UTF-8 or C locale): refused as such, not with the tokenizer's
    "TextEncodeInput must be Union[...]"."""
    _, shards = split_dir
    prompt = b"h\xe9llo".decode("utf-8", "surrogateescape")
    argv = ["generate", str(shards), "--max-new-tokens", "2", "--device", "cpu"]
    if where == "stdin":
        monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))
    else:
        argv.insert(2, prompt)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "The prompt is not valid UTF-8 text" in captured.err and "TextEncodeInput" not in captured.err
    assert captured.out == ""


_UNDER_THE_C_LOCALE = r"""
import contextlib, io, json, os, sys
from hf_layerstream.cli import main

shards, prompt = sys.argv[1:3]
argv = ["generate", shards, "--max-new-tokens", "2", "--device", "cpu"]
runs = []
for args, piped in (([*argv, prompt], None), (argv, os.fsencode(prompt) + b"\n"), (argv, b"h\xe9llo\n")):
    if piped is not None:  # (standard input as Python makes it under this locale: its encoding, `surrogateescape`)
        sys.stdin = io.TextIOWrapper(io.BytesIO(piped), encoding=sys.__stdin__.encoding, errors=sys.__stdin__.errors)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        runs.append([main(args), out.getvalue(), err.getvalue()])
print(json.dumps({"utf8_mode": sys.flags.utf8_mode, "argv": ascii(prompt), "runs": runs}))
"""


def test_a_utf8_prompt_is_taken_with_pythons_utf8_mode_off(split_dir, capsys, monkeypatch):
    """Under `LC_ALL=C` with Python's UTF-8 mode off (`PYTHONUTF8=0 PYTHONCOERCECLOCALE=0`), Python decodes the
    command line and standard input as ASCII, each other byte a lone surrogate (`surrogateescape`): a UTF-8 prompt,
    as an argument or piped in, was refused as "not valid UTF-8 text". Its bytes are put back and decoded as UTF-8
    now: the text is the one generated from the prompt under a UTF-8 locale; bytes that are not UTF-8 are refused."""
    from conftest import run_python

    ckpt, shards = split_dir
    prompt = "caf\u00e9 \u201cq\u201d"
    assert main(["generate", str(shards), prompt, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    expected = capsys.readouterr().out
    assert expected.startswith(prompt)
    for name, value in (("LC_ALL", "C"), ("PYTHONUTF8", "0"), ("PYTHONCOERCECLOCALE", "0")):
        monkeypatch.setenv(name, value)
    proc = run_python(_UNDER_THE_C_LOCALE, shards, prompt)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)
    assert child["utf8_mode"] == 0 and "\\udc" in child["argv"], child  # (the locale this is about)
    (argument, argument_out, err), (piped, piped_out, piped_err), (latin1, latin1_out, latin1_err) = child["runs"]
    assert (argument, argument_out) == (0, expected), err
    assert (piped, piped_out) == (0, expected), piped_err
    assert latin1 == 2 and latin1_out == "" and "The prompt is not valid UTF-8 text" in latin1_err, latin1_err


@pytest.mark.parametrize("verbose", [[], ["-v"], ["--verbose"]], ids=["quiet", "-v", "--verbose-after-the-command"])
def test_generate_prints_its_profile_once(split_dir, capsys, caplog, verbose):
    """`generate --profile` prints the call's profile; with `-v`, which logs every generate call's profile, it was
    printed twice. `-v` after the command (`generate ... -v`) was refused, "unrecognized arguments: --verbose", where
    it is an option of the program: taken there too."""
    _, shards = split_dir
    argv = ["generate", str(shards), _models.SAMPLE_PROMPTS[0], "--max-new-tokens", "2", "--device", "cpu"]
    with caplog.at_level("INFO" if verbose else "WARNING", logger="hf_layerstream"):
        if verbose == ["--verbose"]:
            assert main([*argv, "--profile", *verbose]) == 0
        else:
            assert main(verbose + [*argv, "--profile"]) == 0
    shown = capsys.readouterr().err + caplog.text
    assert shown.count("forward calls: 2,") == 1, shown
    parser = build_parser()  # (what the logging is set up from)
    given = [*verbose, *argv] if verbose != ["--verbose"] else [*argv, *verbose]
    assert parser.parse_known_args(given)[0].verbose is bool(verbose)


def test_generate_from_a_jsonl_file_prints_its_profile(split_dir, tmp_path, capsys):
    """`--profile` with `--input` covers the whole job: every batch's generate call, not only the last one's (the
    profile restarts at each call)."""
    _, shards = split_dir
    lines = [json.dumps({"id": i, "prompt": p}) for i, p in enumerate(_models.SAMPLE_PROMPTS[:3])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    argv += ["--batch-size", "1", "--max-new-tokens", "2", "--device", "cpu", "--profile"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    stats = json.loads(next(line for line in err.splitlines() if line.startswith("{")))
    assert stats["generated"] == 3 and stats["batches"] == 3
    profile = err.split(json.dumps(stats), 1)[1]
    # one forward call per sweep of the model, in all three batches (2 tokens each)
    assert stats["sweeps"] == 6 and f"forward calls: {stats['sweeps']}," in profile
    assert "profile of the whole job (3 generate calls):" in profile and "compute" in profile and "wait" in profile
    # a job of one batch: one call (it said "1 generate calls")
    argv[argv.index("--output") + 1] = str(tmp_path / "one.jsonl")
    argv[argv.index("--batch-size") + 1] = "8"
    assert main(argv) == 0
    assert "profile of the whole job (1 generate call):" in capsys.readouterr().err


def test_a_jsonl_job_names_keys_its_lines_do_not_take_once(split_dir, tmp_path, capsys, caplog):
    """The command reads a regular input file before the model loads (`check_job`) and again for the job: a key no
    line takes is named in one warning, not two."""
    _, shards = split_dir
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "Hello", "answer": "x"}\n')
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        assert main([*argv, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    shown = capsys.readouterr().err + caplog.text
    assert shown.count("key 'answer' is not read (first on line 1)") == 1


@pytest.mark.parametrize(
    "between, prompt",
    [
        (["--max-new-tokens", "4"], _models.SAMPLE_PROMPTS[0]),
        (["--chat", "--max-new-tokens", "4"], _models.SAMPLE_PROMPTS[0]),
        (["--max-new-tokens", "4", "--"], _models.SAMPLE_PROMPTS[0]),
        (["--max-new-tokens", "4"], "- item one"),
        (["--max-new-tokens", "4"], "-5"),
    ],
    ids=["after-an-option", "after-a-flag", "after-dashes", "a-dash-and-a-space", "a-negative-number"],
)
def test_generate_prompt_after_options(split_dir, capsys, between, prompt):
    """`generate SHARD_DIR --max-new-tokens 4 PROMPT`: a prompt after the options is the prompt (argparse fills an
    optional positional from the first run of positionals only, and refused it as an unrecognized argument), also one
    that begins with a dash where argparse reads it as a positional ("- item one", "-5": refused before; "-" alone
    reads standard input, `test_a_dash_prompt_reads_standard_input`)."""
    ckpt, shards = split_dir
    assert main(["generate", str(shards), "--device", "cpu", *between, prompt]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    if "--chat" not in between:  # (the chat template changes what the model sees)
        assert out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 4).strip()


@pytest.mark.parametrize(
    "argv, leftover",
    [
        (["generate", "{shards}", "--max-new-tokens", "3", "Once", "upon"], "upon"),
        (["generate", "{shards}", "hi", "--max-new-tokens", "3", "there"], "there"),
        (["generate", "{shards}", "--bogus", "hi"], "--bogus"),
        (["inspect", "{shards}", "extra"], "extra"),
    ],
    ids=["second-word", "prompt-given", "unknown-option", "other-command"],
)
def test_other_leftover_arguments_are_usage_errors(split_dir, capsys, argv, leftover):
    _, shards = split_dir
    with pytest.raises(SystemExit) as e:
        main([a.format(shards=shards) for a in argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: unrecognized arguments: {leftover}\n")


def test_missing_bitsandbytes_is_a_one_line_error(split_dir, tmp_path, monkeypatch, capsys):
    """Quantized shards without bitsandbytes (an optional extra): the CLI's one-line error with the install hint,
    not a traceback."""
    pytest.importorskip("bitsandbytes")
    ckpt, _ = split_dir
    assert main(["split", str(ckpt), str(tmp_path / "q4"), "--compression", "4bit", "--quiet"]) == 0
    capsys.readouterr()
    for name in ("bitsandbytes", "bitsandbytes.functional"):  # (as if not installed: importing it fails)
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["generate", str(tmp_path / "q4"), "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-layerstream generate: error: This shard directory is quantized")
    assert "pip install bitsandbytes" in err and len(err.splitlines()) == 1


def test_quant_type_and_compression_are_case_insensitive(split_dir, tmp_path, capsys):
    """`--quant-type FP4`, and `--compression 4BIT` as `compression="4BIT"` is taken (argparse refused it as an
    invalid choice)."""
    pytest.importorskip("bitsandbytes")
    ckpt, _ = split_dir
    argv = ["split", str(ckpt), str(tmp_path / "q4"), "--compression", "4BIT", "--quant-type", "FP4", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "q4" / "manifest.json").read_text())
    assert manifest["compression"]["quant_type"] == "fp4" and manifest["compression"]["bits"] == 4


def test_closed_stdout_ends_quietly(split_dir):
    """`generate ... | head -c 3`: once the reader is gone, no "Broken pipe" error and no traceback; exit status 1
    with stdout sent to /dev/null, as the Python docs' Note on SIGPIPE recommends."""
    _, shards = split_dir
    cmd = [sys.executable, "-m", "hf_layerstream", "generate", str(shards), "Once upon", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--max-new-tokens", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # (before it writes anything: its imports alone take longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


def test_a_hub_warning_is_printed_once(split_dir):
    """huggingface_hub prints its warnings (retries while the hub cannot be reached) through a handler of its own; the
    command line's root handler printed each a second time."""
    _, shards = split_dir
    code = (
        "import sys; from hf_layerstream.cli import main; main(['inspect', sys.argv[1]]);"
        "from huggingface_hub.utils import logging; logging.get_logger('huggingface_hub.utils._http').warning('retry 1')"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(shards)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.count("retry 1") == 1, proc.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_split_quiet_leaves_out_the_hubs_retries(tmp_path, quiet):
    """`split --quiet` of a source the hub could not be asked about (a misspelt folder, `models/llama`, offline)
    printed ten lines of huggingface_hub's retries before its error; they are left out now, and the hub's other
    warnings are not."""
    code = (
        "import sys\n"
        "from huggingface_hub.utils import logging\n"
        "from hf_layerstream import split\n"
        "from hf_layerstream.cli import main\n"
        "def fake(*args, **kwargs):\n"
        "    hub = logging.get_logger('huggingface_hub.utils._http')\n"
        "    hub.warning(\"'[Errno -2] Name or service not known' thrown while requesting HEAD https://hf.co/x\")\n"
        "    hub.warning('Retrying in 1s [Retry 1/5].')\n"
        "    hub.warning('This repo is deprecated')\n"
        "    raise FileNotFoundError('no such repo')\n"
        "split.split_checkpoint = fake\n"
        "sys.exit(main(['split', 'models/llama', sys.argv[1], *sys.argv[2:]]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out"), *(["--quiet"] if quiet else [])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "error: no such repo" in proc.stderr, proc.stderr
    assert "This repo is deprecated" in proc.stderr
    assert ("thrown while requesting" in proc.stderr) is not quiet and ("[Retry 1/5]" in proc.stderr) is not quiet


@pytest.mark.parametrize("source", ["models\\llama", "my models/llama", "llama-7b/"])
def test_split_of_a_missing_folder_no_hub_id_can_name_says_so(tmp_path, monkeypatch, capsys, source):
    """A misspelt local folder that cannot be a hub repo id (a backslash, a space, a trailing `/`) was refused with
    huggingface_hub's message about repo ids ("Repo id must use alphanumeric chars ..."): it is named as a folder that
    is not there now, as `./models/llama` is."""
    monkeypatch.chdir(tmp_path)
    assert main(["split", source, "out", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"`source` {source} is neither an existing local checkpoint folder nor a hub repo id" in err, err
    assert "Repo id must" not in err and not (tmp_path / "out").exists()


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "{shards}", "hi", "--dtype", "bf16"], "`--dtype` 'bf16' is not a torch dtype name"),
        (["inspect", "{shards}", "--dtype", "fp16"], "`--dtype` 'fp16' is not a torch dtype name (e.g. 'bfloat16'"),
        (["inspect", "{shards}", "--max-memory", "cpu16GiB"], "--max-memory item 'cpu16GiB' must look like"),
        (["inspect", "{shards}", "--prefetch", "-1"], "`--prefetch` must be a non-negative int, got -1"),
        (["inspect", "{shards}", "--dtype", "int8"], "`--dtype` 'int8' is not a floating-point dtype: pass float32,"),
        (["split", "{ckpt}", "{tmp}/out", "--dtype", "fp16"], "`--dtype` 'fp16' is not a torch dtype name"),
        (["generate", "{shards}", "hi", "--assistant", "{ckpt}", "--prompt-lookup", "3"], "either `--assistant` or"),
        (["generate", "{shards}", "hi", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/o"], "either a PROMPT or"),
        (["generate", "{shards}", "hi", "--prompt-lookup", "0"], "`--prompt-lookup` must be a positive"),
        # (an OverflowError traceback, once the model had loaded and the prompt was printed)
        (["generate", "{shards}", "hi", "--prompt-lookup", str(2**70)], f"at most {2**31 - 1}, got {2**70}."),
        (["generate", "{shards}", "hi", "--max-new-tokens", "0"], "`--max-new-tokens` must be a positive"),
        # (torch's "Overflow when unpacking long long" once the model had loaded, naming no option)
        (["generate", "{shards}", "hi", "--do-sample", "--seed", str(2**64)], f"`--seed` {2**64} is out of range"),
        (["generate", "{shards}", "hi", "--assistant", "{shards}"], "is a shard directory; the draft model is loaded"),
        (["generate", "{shards}", "hi", "--assistant", "{tmp}"], "is a folder without a config.json, not a model"),
        (["generate", "{shards}", "hi", "--output", "{tmp}/o"], "`--output` only applies with `--input`"),
        (["generate", "{shards}", "hi", "--batch-size", "4"], "`--batch-size` only applies with `--input`"),
        (["generate", "{shards}", "hi", "--num-assistant-tokens", "4"], "`--num-assistant-tokens` only applies with"),
        (["demo", "--dtype", "bfloat61"], "`--dtype` 'bfloat61' is not a checkpoint dtype"),
        # (an alias: written as float16, the checkpoint then seemed another's at the next run, asking for 'half')
        (["demo", "--dtype", "half"], "`--dtype` 'half' is not a checkpoint dtype (use float32, bfloat16 or float16)"),
        (
            ["split", "{ckpt}", "{tmp}/out", "--quant-type", "fp4"],
            # (a 4-bit code: 4-bit compression named alone, as 8-bit with fp4 is refused next)
            "--quant-type 'fp4' only applies to quantized shards; pass --compression '4bit' as well (or drop it",
        ),
        (
            ["split", "{ckpt}", "{tmp}/out", "--blocksize", "64"],
            "--blocksize 64 only applies to quantized shards; pass --compression '4bit' or '8bit' as well",
        ),
        # (a flag: named as it is typed, not `--double-quant True`)
        (
            ["split", "{ckpt}", "{tmp}/out", "--double-quant"],
            "--double-quant only applies to quantized shards; pass --compression '4bit' as well (or drop it",
        ),
        (
            ["split", "{ckpt}", "{tmp}/out", "--double-quant", "--compression", "8bit"],
            "`--double-quant` applies to 4-bit quantization only, got --compression '8bit' (8-bit): pass --compression "
            "'4bit' with it, or drop it to quantize to 8 bits.",
        ),
        # (a traceback; and a split that `generate` then failed on with a traceback: `LlamaModel` has no `generate`)
        (
            ["split", "{ckpt}", "{tmp}/out", "--model-class", "GPT2LMHeadModel"],
            "`--model-class` GPT2LMHeadModel does not build from this checkpoint's config (LlamaConfig",
        ),
        (["split", "{ckpt}", "{tmp}/out", "--model-class", "LlamaModel"], "builds LlamaModel, which cannot generate"),
        (["split", "{ckpt}", "{tmp}/out", "--remove-from-cache"], "is a local folder, which the split never modifies"),
    ],
    ids=[
        "generate-dtype",
        "inspect-dtype-name",
        "inspect-max-memory",
        "inspect-prefetch",
        "inspect-dtype",
        "split-dtype",
        "assistant-and-lookup",
        "prompt-and-input",
        "lookup-0",
        "lookup-past-torch-integers",
        "max-new-tokens-0",
        "seed-out-of-range",
        "assistant-shard-dir",
        "assistant-folder-without-config",
        "output-without-input",
        "batch-size-without-input",
        "draft-tokens-without-assistant",
        "demo-dtype",
        "demo-dtype-alias",
        "quant-type-without-compression",
        "blocksize-without-compression",
        "double-quant-without-compression",
        "double-quant-with-8bit",
        "model-class-of-another-architecture",
        "model-class-without-head",
        "remove-from-cache-of-a-local-folder",
    ],
)
def test_bad_option_values_are_clear_errors(split_dir, tmp_path, capsys, argv, message):
    """A misspelled value fails with the CLI's one-line error and exit status 2, not a traceback (or, for split's
    dtype, silently not casting)."""
    ckpt, shards = split_dir
    argv = [a.format(shards=shards, ckpt=ckpt, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "model_class, why",
    [
        ("AutoModelForSeq2SeqLM", "AutoModelForSeq2SeqLM has no model for LlamaConfig"),
        ("AutoModelForMaskedLM", "AutoModelForMaskedLM has no model for LlamaConfig"),
        ("GPT2LMHeadModel", "AttributeError: 'LlamaConfig' object has no attribute"),
    ],
)
def test_a_model_class_that_does_not_build_from_the_config_is_one_refusal_naming_the_class_to_pass(
    split_dir, tmp_path, capsys, model_class, why
):
    """`split --model-class AutoModelForSeq2SeqLM` of a Llama checkpoint was refused over two lines: transformers'
    "Unrecognized configuration class ... for this kind of AutoModel", then, on a line of its own, "Model type should
    be one of" its forty-odd seq2seq configs, ending "..", then "Pass the class of its architecture", naming none. One
    line now: what is wrong, and the class to pass instead (the one the split builds without the option)."""
    ckpt, _ = split_dir
    assert main(["split", str(ckpt), str(tmp_path / "out"), "--model-class", model_class, "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(
        f"hf-layerstream split: error: `--model-class` {model_class} does not build from this checkpoint's config "
        f"(LlamaConfig, model type 'llama'): {why}"
    ), err
    assert err.endswith(
        ". Pass the class of its architecture ('AutoModelForCausalLM' builds it), or leave `--model-class` out.\n"
    ), err
    assert "Model type should be one of" not in err and ".." not in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_peft_adapter_folder_is_taken_as_a_draft(split_dir, tmp_path, monkeypatch):
    """`--assistant` refuses a folder without config.json before the model loads, but not a PEFT adapter's (its
    adapter_config.json: `from_pretrained` loads it, with peft installed): past the early checks, the model loads."""
    import hf_layerstream.cli as cli

    _, shards = split_dir

    class LoadedError(Exception):
        pass

    def load(*args, **kwargs):
        raise LoadedError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(cli, "load_streamed_model", load)
    with pytest.raises(LoadedError):
        main(["generate", str(shards), "hi", "--assistant", str(adapter)])
    (adapter / "adapter_config.json").unlink()
    assert main(["generate", str(shards), "hi", "--assistant", str(adapter)]) == 2


def test_a_layer_that_fails_to_load_during_generate_is_a_one_line_error(split_dir, capsys, monkeypatch):
    """A shard file that changed or went bad while `generate` streams (the loader raises `LayerLoadError`, caused by
    a `ShardFileError`): the one-line error with exit status 2, as one found before loading is, not a traceback. An
    error of another kind in the loader (a fault of ours) keeps its traceback."""
    from hf_layerstream import LayerLoadError, ShardFileError
    from hf_layerstream.engine import LayerLoader

    _, shards = split_dir
    path = shards / "layers" / "00000.safetensors"

    def changed(self, index, *_):
        raise ShardFileError(path, "changed on disk since it was opened", "Do not modify a shard directory.")

    monkeypatch.setattr(LayerLoader, "_load_streamed", changed)
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--max-memory", "cpu=0", "--prefetch", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-layerstream generate: error: Loading decoder layer 0 from ") and err.count("\n") == 1
    assert "changed on disk since it was opened" in err

    def bug(self, index, *_):
        raise KeyError("a fault of ours")

    monkeypatch.setattr(LayerLoader, "_load_streamed", bug)
    with pytest.raises(LayerLoadError, match="KeyError"):
        main(argv)


def test_a_trailing_comma_in_max_memory_is_harmless(split_dir, capsys):
    _, shards = split_dir
    assert main(["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0,"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["streamed"] == [0, 1, 2]


def test_an_empty_max_memory_or_a_key_the_library_refuses_is_refused(split_dir, capsys):
    """`--max-memory ,` (or an empty one: a shell variable left unset) gave no budget and planned as if the option were
    not given, without a word; `00=1GiB` was taken as GPU 0, where the library refuses the key "00" (the plan looks
    GPUs up as 0 or "0"): both are refused, naming the fix."""
    from hf_layerstream.engine import check_max_memory

    _, shards = split_dir
    for budget in (",", " , ,", ""):
        assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", budget]) == 2, budget
        err = capsys.readouterr().err
        assert f"--max-memory {budget!r} gives no budget" in err and "leave the option out" in err, err
    with pytest.raises(ValueError, match="key '00' is not recognized \\(the key is 0\\)"):
        check_max_memory({"00": "1GiB"})
    for budget in ("00=1GiB", "0=1GiB,00=2GiB"):
        assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", budget]) == 2, budget
        assert "`--max-memory` key '00' is not recognized (the key is 0)" in capsys.readouterr().err, budget


def test_max_memory_given_twice_or_keyed_as_a_device_name_is_refused(split_dir, capsys):
    """`--max-memory cpu=1GiB,cpu=0` kept the last silently; `--device cuda --max-memory cuda:0=1GiB` on a machine
    without a GPU said to give its budget (it had), not that the key for cuda:0 is 0. The key given twice is named
    with the fix (it named none)."""
    _, shards = split_dir
    for budget, device, message in (
        ("cpu=1GiB,cpu=0", "cpu", "--max-memory gives cpu twice: 'cpu=1GiB,cpu=0'; give each key once."),
        ("0=1GiB,0=2GiB", "cpu", "--max-memory gives 0 twice"),
        ("cuda:0=1GiB", "cuda", "for cuda:0, the key is 0"),
        ("CPU=1GiB", "cpu", "`--max-memory` key 'CPU' is not recognized (the key is 'cpu')"),
    ):
        assert main(["inspect", str(shards), "--device", device, "--max-memory", budget]) == 2, budget
        assert message in capsys.readouterr().err, budget


def test_an_option_value_beginning_with_a_dash_is_taken_as_its_value(split_dir, capsys):
    """`--max-memory -1=4GiB` (a value beginning with a dash, not a negative number) was read by argparse as an option
    of its own: "argument --max-memory: expected one argument", where one was given, and the fix (writing
    `--max-memory=-1=4GiB`) named nowhere. It is taken as the option's value, as `--max-memory=-1=4GiB` is, and
    checked as such; a value that is one of the command's options (or an abbreviation of one) is still an option."""
    _, shards = split_dir
    for option, budget in (("--max-memory", "-1=4GiB"), ("--max-mem", "-1=4GiB"), ("--max-memory", "-cpu=1GiB")):
        assert main(["inspect", str(shards), "--device", "cpu", option, budget]) == 2, budget
        key = budget.partition("=")[0]
        assert f"`--max-memory` key '{key}' is not recognized" in capsys.readouterr().err, budget
    # (refused before the model loads: the value reached the option's own check)
    assert main(["generate", str(shards), "hi", "--tokenizer", "-x"]) == 2
    assert "`--tokenizer` -x is neither an existing local folder nor a hub repo id" in capsys.readouterr().err
    for value in ("--json", "--js", "--device=cpu"):
        with pytest.raises(SystemExit):
            main(["inspect", str(shards), "--max-memory", value])
        assert "argument --max-memory: expected one argument" in capsys.readouterr().err, value


def test_inspect_and_verify(split_dir, capsys):
    _, shards = split_dir
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "compression      none" in out
    # a local source has no revision ("(revision None)" before)
    assert f"source           {ShardDirectory(shards).manifest.source['id']}\n" in out and "revision" not in out
    # sizes in the unit `engine.size_text` gives messages and the plan summary (a tiny model's in KiB)
    directory = ShardDirectory(shards)
    layer_sizes = [directory.unit(f"layers.{i}").size for i in range(3)]
    assert f"resident file    {size_text(directory.unit('resident').size)}\n" in out
    assert f"per layer        {size_text(sum(layer_sizes) // 3)} on disk (mean), " in out
    assert " KiB on disk (mean), " in out
    assert main(["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] == 3 and info["plan"]["streamed"] == [0, 1, 2]
    assert info["plan"]["page_cache_layers"] == [0, 1, 2]  # auto: the tiny model fits
    for choice, expected in (("drop", []), ("keep", [0, 1, 2])):
        argv = ["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=0", "--page-cache", choice]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["plan"]["page_cache_layers"] == expected
    # `--dtype`: the plan counts the resident parts and the layers at that dtype (this checkpoint is float32)
    plans, infos = {}, {}
    for dtype in ("float32", "bfloat16"):
        assert main(["inspect", str(shards), "--json", "--device", "cpu", "--dtype", dtype]) == 0
        infos[dtype] = json.loads(capsys.readouterr().out)
        plans[dtype] = infos[dtype]["plan"]
    # the same keys whatever `--dtype` (they were renamed after it, and the bf16 sizes left out)
    assert infos["float32"].keys() == infos["bfloat16"].keys() == info.keys()
    assert infos["float32"]["bf16_layer_bytes"] == infos["bfloat16"]["full_layer_bytes"] == info["bf16_layer_bytes"]
    assert [b // 2 for b in infos["float32"]["full_layer_bytes"]] == info["bf16_layer_bytes"]
    assert infos["float32"]["ratio_dtype"] == "float32" and info["ratio_dtype"] == "bfloat16"
    assert infos["float32"]["ratio_to_bf16"] == info["ratio_to_bf16"] == info["ratio"]
    assert infos["float32"]["ratio"] == pytest.approx(info["ratio"] / 2, abs=1e-4)
    for key in ("resident_bytes", "layer_bytes"):
        half = [b // 2 for b in plans["float32"][key]] if key == "layer_bytes" else plans["float32"][key] // 2
        assert plans["bfloat16"][key] == half, key
    assert main(["verify", str(shards)]) == 0
    assert "all 4 files match" in capsys.readouterr().out


def test_inspect_names_the_dtype_the_model_computes_in(tmp_path, capsys):
    """A checkpoint stored in float32 whose config says bfloat16 streams at bfloat16, as `from_pretrained(dtype=
    "auto")` loads it: `inspect` says both (it said "dtype float32", half of what the plan counts for each layer)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert main(["split", str(ckpt), str(tmp_path / "shards"), "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "shards"), "--device", "cpu"]) == 0
    assert "3 layers under 'model.layers', stored in float32, computes in bfloat16" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "shards"), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float32" and info["compute_dtype"] == "bfloat16"
    assert main(["inspect", str(tmp_path / "shards"), "--device", "cpu", "--dtype", "float32"]) == 0
    assert "3 layers under 'model.layers', dtype float32" in capsys.readouterr().out


def test_inspect_shows_the_host_memory_the_default_plan_used(split_dir, capsys, monkeypatch):
    """In a container /proc/meminfo shows the whole host: `inspect` says what the default plan took its share of, the
    room under the cgroup's memory limit where that is less, and the plan's budget follows it."""
    from hf_layerstream import engine

    _, shards = split_dir
    monkeypatch.setattr(engine, "memory_reading", lambda: (20 * 2**30, "MemAvailable"))
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: None)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert "host memory      20.00 GiB available (MemAvailable 20.00 GiB)\n" in capsys.readouterr().out
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: 3 * 2**30)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "host memory      3.00 GiB available (MemAvailable 20.00 GiB; left under this process's cgroup memory" in out
    assert "[budget cpu: 1.50 GiB]" in out
    assert main(["inspect", str(shards), "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["host_memory"] == {
        "available": 3 * 2**30,
        "mem_available": 20 * 2**30,
        "cgroup_room": 3 * 2**30,
        "mem_available_from": "MemAvailable",
    }
    assert info["plan"]["budgets"]["cpu"] == int(engine.DEFAULT_HOST_SHARE * 3 * 2**30)
    # (a system that reports no available memory: the default plan's 4 GiB is said to be assumed)
    monkeypatch.setattr(engine, "memory_reading", lambda: (4 * 2**30, "assumed"))
    monkeypatch.setattr(engine, "cgroup_memory_room", lambda: None)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert (
        "4.00 GiB available (assumed 4.00 GiB: this system reports none; plan with --max-memory)\n"
        in capsys.readouterr().out
    )


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


def test_verify_of_a_newer_format_says_to_upgrade_not_to_split_again(split_dir, tmp_path, capsys):
    """A manifest a newer hf_layerstream wrote is not damaged: `verify` called it damaged and said to split again
    there with `--overwrite` (replacing the newer split with this version's, the downgrade `ShardDirectory` and
    `split` refuse to suggest). It now gives the manifest's own fix, to upgrade, as `inspect` does."""
    _, shards = split_dir
    copy = tmp_path / "newer"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "written by a newer hf_layerstream (shard format version 2" in err
    assert "Upgrade hf_layerstream" in err
    assert "damaged" not in err and "--overwrite" not in err
    # (a manifest that is damaged still gets the advice to split again)
    (copy / "manifest.json").write_text("{")
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "is not readable JSON" in err and "is damaged: split again there" in err


def test_verify_names_the_directory_by_one_path(split_dir, tmp_path, monkeypatch, capsys):
    """`verify` of a relative path named the directory absolute in every line (as `inspect` does) but the last of a
    damaged manifest, which gave it as typed: "/abs/shards/manifest.json is not readable JSON" then "The manifest of
    shards is damaged". Absolute in both now."""
    _, shards = split_dir
    copy = tmp_path / "typed"
    shutil.copytree(shards, copy)
    monkeypatch.chdir(tmp_path)
    (copy / "resident.safetensors").unlink()
    assert main(["verify", "typed", "--quick"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{copy / 'resident.safetensors'} is missing")
    assert f"4 files and 5 side files of {copy}: delete" in captured.err
    (copy / "manifest.json").write_text("{")
    assert main(["verify", "typed"]) == 1
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith(f"{copy / 'manifest.json'} is not readable JSON")
    assert second.startswith(f"The manifest of {copy} is damaged: split again there")


def test_verify_names_each_damaged_file_without_telling_to_run_verify(split_dir, tmp_path, capsys):
    """Each damaged file `verify` listed carried the fix of an error raised while loading: "Re-create the shard
    directory ..., or run `hf-layerstream verify` to list every damaged file", telling the user running `verify` to
    run it, and to re-create the whole directory where its summary says to delete the files named and split again
    (or, for a download, to download them again). A line names the file and its problem now, the summary the fix."""
    _, shards = split_dir
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "layers" / "00001.safetensors"
    os.truncate(victim, 1000)
    (copy / "resident.safetensors").unlink()
    for quick in ([], ["--quick"]):
        assert main(["verify", str(copy), *quick]) == 1
        captured = capsys.readouterr()
        lines = captured.out.splitlines()
        assert len(lines) == 2, lines
        assert any(line.startswith(f"{victim} has 1000 bytes but the manifest records") for line in lines), lines
        assert any(line.startswith(f"{copy / 'resident.safetensors'} is missing") for line in lines), lines
        assert "hf-layerstream verify" not in captured.out and "Re-create" not in captured.out
        assert "2 problem(s) in 4 files" in captured.err and "delete the files named" in captured.err


def test_inspect_of_a_damaged_layer_file_shows_the_plan_and_names_the_file_with_the_fix(split_dir, tmp_path, capsys):
    """`inspect` refused a shard directory whose layer file failed the check every load makes (size, header, sample
    digest) with that error alone: no plan, no manifest, and only the first damaged file. It shows them now, then
    names each damaged file and the fix (`verify`'s: delete them and re-run the same split, or download them again),
    and exits 1, as `verify` does; `--json` lists them in `damaged`, the fix in `repair` (a sound one: none)."""
    _, shards = split_dir
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    as_json = ["inspect", str(copy), "--json", "--device", "cpu", "--max-memory", "cpu=1GiB"]
    assert main(as_json) == 0
    sound = json.loads(capsys.readouterr().out)
    assert sound["damaged"] == [] and sound["repair"] is None
    victim, truncated = copy / "layers" / "00001.safetensors", copy / "layers" / "00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: the sample digest
    victim.write_bytes(bytes(data))
    os.truncate(truncated, 1000)
    assert main(["inspect", str(copy), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "3 layers" in captured.out and "plan on cpu" in captured.out and "compression      none" in captured.out
    damaged = [line for line in captured.out.splitlines() if line.startswith("damaged ")]
    assert len(damaged) == 2, captured.out
    assert damaged[0].startswith(f"damaged          {victim} has the recorded size and header but other content")
    assert damaged[1].startswith(f"damaged          {truncated} has 1000 bytes but the manifest records")
    assert "2 problem(s) in 4 files" in captured.err and "delete the files named and re-run the same split" in (
        captured.err
    )
    assert "`hf-layerstream verify" in captured.err, captured.err  # (which also hashes every file)
    assert main(as_json) == 1
    info = json.loads(capsys.readouterr().out)
    assert info.keys() == sound.keys() and info["plan"] == sound["plan"]
    assert [p.split(" ")[0] for p in info["damaged"]] == [str(victim), str(truncated)]
    assert "delete the files named" in info["repair"]
    # the fix it gives works
    victim.unlink()
    truncated.unlink()
    assert main(["split", str(split_dir[0]), str(copy), "--quiet"]) == 0
    assert main(["inspect", str(copy), "--device", "cpu"]) == 0


def test_layers_linked_to_another_disk_are_named_with_the_fix_not_as_a_damaged_manifest(split_dir, tmp_path, capsys):
    """A split whose `layers/` was moved to another disk and symlinked back is refused (its files must lie inside
    it), but `verify` said its manifest.json was damaged and to split again there with `--overwrite` (which refuses
    `layers` as a symlink), and `inspect` to re-create the directory. Both now name the symlinked file and the fix."""
    _, shards = split_dir
    copy, elsewhere = tmp_path / "copy", tmp_path / "other_disk"
    shutil.copytree(shards, copy)
    shutil.move(copy / "layers", elsewhere)
    (copy / "layers").symlink_to(elsewhere)
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    layer = copy / "layers" / "00000.safetensors"
    assert f"{layer} resolves outside the directory to {elsewhere / '00000.safetensors'}, through a symlink" in err
    assert "make the whole shard directory the folder on the other disk" in err
    assert "damaged" not in err and "--overwrite" not in err
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{layer} resolves outside the directory" in err and "make the whole shard directory" in err
    assert "Re-create" not in err
    # the fix it gives works: the whole directory on the other disk, linked
    (copy / "layers").unlink()
    shutil.move(elsewhere, copy / "layers")
    shutil.move(copy, elsewhere)
    copy.symlink_to(elsewhere)
    assert main(["verify", str(copy)]) == 0


def test_verify_tells_a_file_this_user_may_not_read_from_a_damaged_one(split_dir, monkeypatch, capsys):
    """A layer file this user may not read (mode 000, another owner) was reported with the fix for damage: re-create
    the shard directory, delete the files named and split again. It is named now with the fix for permissions, and
    enabling says so too. (Run as root, the refusal is simulated at `os.open`.)"""
    import errno
    import os

    from hf_layerstream.errors import UNREADABLE_BY_THIS_USER, unreadable

    _, shards = split_dir
    victim = shards / "layers" / "00001.safetensors"
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path) == str(victim):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    assert main(["verify", str(shards), "--quick"]) == 1
    captured = capsys.readouterr()
    assert f"{victim} cannot be read: Permission denied. {UNREADABLE_BY_THIS_USER}" in captured.out
    assert "the files named could not be read, but may be sound: fix what each message names" in captured.err
    assert "delete the files named" not in captured.err
    with pytest.raises(ShardFileError, match="This user may not read it"):
        ShardDirectory(shards)
    monkeypatch.undo()
    assert main(["verify", str(shards), "--quick"]) == 0
    damaged = unreadable(victim, OSError(errno.EIO, "Input/output error"))
    assert damaged.fix is None and "Re-create the shard directory" in str(damaged)  # (damage: the default fix)
    # the process's limits are not damage either: too many files open (a map of each layer file holds one), maps
    for err, named in ((errno.EMFILE, "ulimit -n"), (errno.ENOMEM, "vm.max_map_count")):
        limit = unreadable(victim, OSError(err, os.strerror(err)))
        assert named in str(limit) and "Re-create" not in str(limit), err


def test_a_manifest_this_user_may_not_read_is_not_called_damaged(split_dir, monkeypatch, capsys):
    """A manifest.json this user may not read was "not readable JSON ([Errno 13] Permission denied ...)", and `verify`
    called the manifest damaged, saying to split again there with `--overwrite`. It is named now with the fix for
    permissions, as a layer file is, by `verify` and `inspect`. (Run as root, the refusal is simulated.)"""
    import errno
    import pathlib

    from hf_layerstream.errors import UNREADABLE_BY_THIS_USER

    _, shards = split_dir
    manifest = shards / "manifest.json"
    real_read_text = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == str(manifest):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert f"{manifest} cannot be read: Permission denied\n{UNREADABLE_BY_THIS_USER}\n" in err
    assert "damaged" not in err and "JSON" not in err
    assert main(["inspect", str(shards)]) == 2
    assert f"{manifest} cannot be read: Permission denied. {UNREADABLE_BY_THIS_USER}" in capsys.readouterr().err


def test_a_config_this_user_may_not_read_or_a_folder_there_is_named_so(split_dir, tmp_path, monkeypatch, capsys):
    """A config.json this user may not read was "not readable JSON ([Errno 13] Permission denied ...)": `verify`
    counted it as damage (delete it and split again), `inspect` said to split again. It is named with the fix for
    permissions now, and `verify` says it may be sound. A folder in its place was "missing": "not a regular file"
    now. (Run as root, the refusal is simulated.)"""
    import errno
    import pathlib

    from hf_layerstream.errors import UNREADABLE_BY_THIS_USER

    _, shards = split_dir
    config = shards / "config.json"
    real_read_text = pathlib.Path.read_text  # (config.json is read as transformers reads it: UTF-8 text)

    def read_text(self, *args, **kwargs):
        if str(self) == str(config):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read_text(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "read_text", read_text)
        assert main(["verify", str(shards), "--quick"]) == 1
        captured = capsys.readouterr()
        assert f"{config} cannot be read: Permission denied. {UNREADABLE_BY_THIS_USER}" in captured.out
        assert "JSON" not in captured.out
        assert "could not be read, but may be sound" in captured.err and "delete the files" not in captured.err
        assert main(["inspect", str(shards)]) == 2
        err = capsys.readouterr().err
        assert f"{config} cannot be read: Permission denied. {UNREADABLE_BY_THIS_USER}" in err
        assert "Run the same split again" not in err
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "config.json").unlink()
    (copy / "config.json").mkdir()
    assert main(["verify", str(copy), "--quick"]) == 1
    assert f"{copy / 'config.json'} is not a regular file" in capsys.readouterr().out
    assert main(["inspect", str(copy)]) == 2
    assert f"{copy / 'config.json'} is not a regular file" in capsys.readouterr().err


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


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be handled on Windows")
def test_demo_killed_with_sigterm_removes_its_temporary_folder(tmp_path):
    """`demo` (no `--dir`) removes its temporary work folder when it ends, or on Ctrl-C; killed with SIGTERM (`kill`,
    a job scheduler, `timeout`) it was left behind, checkpoint, shards and all. SIGTERM takes Ctrl-C's way now: the
    folder is removed, "terminated" said, exit code 143 (128 + SIGTERM, as a shell reports a process it ended)."""
    import signal
    import time

    temp = tmp_path / "tmp"
    temp.mkdir()
    cmd = [sys.executable, "-m", "hf_layerstream", "demo", "--device", "cpu", "--layers", "2", "--hidden-size", "64"]
    cmd += ["--intermediate-size", "128", "--vocab-size", "256", "--max-new-tokens", "2"]
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()  # (printed once its work folder is made, as it begins writing there)
        assert first.startswith("1. writing a random-weight Llama-shaped checkpoint"), first + proc.stderr.read()
        (work,) = temp.glob("hf_layerstream_demo_*")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.rstrip().endswith("terminated"), err
    assert not work.exists() and not list(temp.glob("hf_layerstream_demo_*"))


@pytest.mark.parametrize("command", [["demo"], ["bench", "--demo", "--systems", "streamed", "--modes", "warm"]])
def test_a_second_ctrl_c_while_the_temporary_folder_is_removed_leaves_none(tmp_path, monkeypatch, capsys, command):
    """`demo` and `bench --demo` remove their temporary work folder on Ctrl-C; a second Ctrl-C while it was removed
    (pressed twice, as people do: it came once the child process measuring a system had been waited for) stopped the
    removal part way, and the folder was left in the temporary folder, a checkpoint and its shards (0.9 GiB of a
    16-layer demo's). A Ctrl-C then is acted on once the folder is removed: none is left, "interrupted", 130."""
    import signal
    import tempfile

    import hf_layerstream._measure as measure

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_unlink, fired = os.unlink, []

    def unlink(*args, **kwargs):
        if not fired:  # (the second Ctrl-C, as the first file of the folder is removed)
            fired.append(args[0])
            signal.raise_signal(signal.SIGINT)
        return real_unlink(*args, **kwargs)

    def first_ctrl_c(spec, **kwargs):  # (as the first system is measured)
        monkeypatch.setattr(os, "unlink", unlink)
        raise KeyboardInterrupt

    monkeypatch.setattr(measure, "run_child", first_ctrl_c)
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    assert main([*command, "--device", "cpu", *tiny, "--max-new-tokens", "2"]) == 130
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert fired and capsys.readouterr().err.rstrip().endswith("interrupted")
    assert not list(tmp_path.glob("hf_layerstream_*"))


@pytest.mark.parametrize("argv", [["demo", "--dir", ""], ["bench", "--demo", "--work", ""]])
def test_an_empty_work_folder_is_refused_and_the_current_folder_left_alone(tmp_path, monkeypatch, capsys, argv):
    """`demo --dir ''` (a shell variable left unset, `--dir "$WORK"`) took '' as the current folder (`Path('')` is
    `.`), wrote its checkpoint and shards there, and, '' being no `--dir` to keep, removed its work folder when done:
    every file of the current folder was deleted. `bench --work ''` alike. Refused before anything is written."""
    import hf_layerstream._measure as measure

    monkeypatch.setattr(measure, "run_child", lambda spec, **kwargs: pytest.fail("a system was run"))
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("the user's")
    monkeypatch.chdir(here)
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    assert main([*argv, *tiny, "--max-new-tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    option = argv[-2]
    assert f"`{option}` is empty: pass a folder, or leave the option out for a temporary one" in err, err
    assert sorted(p.name for p in here.iterdir()) == ["mine.txt"]


def test_a_demo_checkpoint_cut_short_is_written_again_not_reused(tmp_path, monkeypatch, capsys):
    """`demo --dir D` interrupted (Ctrl-C, SIGTERM) once the checkpoint's config.json was written but not its tokenizer
    left a D/checkpoint that the next run reused (config.json of the sizes asked for), then failed for want of the
    tokenizer. config.json, what a checkpoint there is recognized by, is written last."""
    from transformers import PreTrainedTokenizerFast

    import hf_layerstream._measure as measure

    monkeypatch.setattr(measure, "run_child", lambda spec: {"tokens": [1], "s_per_token": 0.1, "peak_rss": 2**20})
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    argv = ["demo", "--dir", str(tmp_path), "--device", "cpu", *tiny, "--max-new-tokens", "2"]
    with monkeypatch.context() as m:

        def interrupted(self, *args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
        assert main(argv) == 130
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert "1. writing a random-weight Llama-shaped checkpoint" in capsys.readouterr().out
    assert (tmp_path / "checkpoint" / "tokenizer.json").is_file()


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


def test_demo_refuses_a_folder_holding_a_checkpoint_of_other_sizes(tmp_path, monkeypatch, capsys):
    """`demo --dir D` a second time with other sizes: refused, naming both (it measured the old checkpoint, ignoring
    the sizes); the same sizes reuse it."""
    import hf_layerstream._measure as measure

    monkeypatch.setattr(measure, "run_child", lambda spec: {"tokens": [1], "s_per_token": 0.1, "peak_rss": 2**20})
    tiny = ["--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256", "--max-new-tokens", "2"]
    argv = ["demo", "--dir", str(tmp_path), "--device", "cpu", *tiny]
    assert main([*argv, "--layers", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint of layers 2, hidden 64, intermediate 128, vocab 256, dtype bfloat16" in err
    assert "not the layers 3, hidden 64, intermediate 128, vocab 256, dtype bfloat16 asked for" in err
    assert main([*argv, "--layers", "2", "--dtype", "float32"]) == 2
    assert "dtype float32 asked for" in capsys.readouterr().err
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["num_hidden_layers"] == 2  # untouched
    assert main([*argv, "--layers", "2"]) == 0
    assert "1. reusing the checkpoint" in capsys.readouterr().out


def test_demo_dir_holds_its_checkpoint_and_shards_and_names_its_own_fixes(tmp_path, monkeypatch, capsys):
    """`demo --dir D` writes D/checkpoint and D/shards (D/shards-4bit with `--compression 4bit`), which neither its help
    ("work folder") nor the README said; its refusals said to "empty D" (a folder of the user's, holding more than the
    demo's) and, for a D/shards holding another split, to pass `overwrite=True` (`--overwrite`), which demo has not.
    The help says where each goes, and each refusal names the demo's own folders and fix."""
    import hf_layerstream._measure as measure
    from hf_layerstream.cli import _command_parser

    monkeypatch.setattr(measure, "run_child", lambda spec: {"tokens": [1], "s_per_token": 0.1, "peak_rss": 2**20})
    help_text = " ".join(_command_parser(build_parser(), "demo").format_help().split())
    assert "DIR/checkpoint" in help_text and "DIR/shards" in help_text, help_text
    work = tmp_path / "mine"
    (work / "notes.txt").parent.mkdir()
    (work / "notes.txt").write_text("the user's")
    tiny = ["--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256", "--max-new-tokens", "2"]
    argv = ["demo", "--dir", str(work), "--device", "cpu", *tiny]
    assert main([*argv, "--layers", "2"]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint", "notes.txt", "shards"]
    capsys.readouterr()
    assert main([*argv, "--layers", "3"]) == 2
    err = capsys.readouterr().err
    assert f"empty {work}" not in err and f"delete {work / 'checkpoint'} and {work / 'shards'}" in err, err
    shutil.rmtree(work / "checkpoint")  # (the shards of the 2-layer checkpoint stay)
    assert main([*argv, "--layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "overwrite" not in err.replace("does not overwrite", ""), err
    assert (
        f"demo does not overwrite a split in its `--dir` folder: pass another `--dir`, or delete {work / 'shards'}"
        in err
    )
    assert (work / "notes.txt").read_text() == "the user's"


def test_demo_compares_double_quantized_shards_as_bench_does(tmp_path, monkeypatch, capsys):
    """`demo --compression` took 4bit and 8bit only, where `bench --compression` takes 4bit-dq too (4-bit with its block
    scales quantized: `split_checkpoint(..., double_quant=True)`). `demo --compression 4bit-dq` splits D/shards-4bit-dq
    so, and its row is lossy as the other quantized ones are."""
    import hf_layerstream._measure as measure
    from hf_layerstream.cli import _command_parser

    monkeypatch.setattr(measure, "run_child", lambda spec: {"tokens": [1, 2], "s_per_token": 0.1, "peak_rss": 2**20})
    monkeypatch.setenv("COLUMNS", "1000")  # (argparse wraps its help at a hyphen too)
    help_text = " ".join(_command_parser(build_parser(), "demo").format_help().split())
    assert "4bit-dq" in help_text and "DIR/shards-4bit-dq" in help_text, help_text
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    argv = ["demo", "--dir", str(tmp_path), "--device", "cpu", *tiny, "--max-new-tokens", "2"]
    assert main([*argv, "--compression", "4BIT-DQ"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards-4bit-dq" / "manifest.json").read_text())
    assert manifest["compression"]["double_quant"] is True and manifest["compression"]["bits"] == 4
    assert re.search(r"streamed, 4bit-dq shards .* 100% \(lossy\)", out), out
    assert "4bit-dq shards vs full precision, teacher-forced over" in out


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--max-memory", "cpu=abc"], "`--max-memory` got the size 'abc'"),
        (["--max-memory", "gpu=1GiB"], "`--max-memory` key 'gpu' is not recognized"),
        # (an empty one ran the default plan without a word, where "," was refused, as generate refuses both)
        (["--max-memory", ""], "--max-memory '' gives no budget: give one or more"),
        (["--max-memory", ","], "--max-memory ',' gives no budget: give one or more"),
        (["--prefetch", "-1"], "`--prefetch` is -1"),
        (["--max-new-tokens", "0"], "`--max-new-tokens` is 0"),
        (["--layers", "0"], "`--layers` is 0"),
        (["--hidden-size", "130"], "`--hidden-size` 130 makes no Llama-shaped model: its 2 attention heads are of 65"),
        (["--hidden-size", "200"], "`--hidden-size` 200 makes no Llama-shaped model: its 3 attention heads do not"),
    ],
)
def test_demo_refuses_its_options_before_writing_anything(tmp_path, monkeypatch, capsys, extra, named):
    """Options the streamed run (a child process) or transformers would refuse: refused with the option named before
    the checkpoint is written, split and run whole (a traceback of the child's, or transformers', before)."""
    import hf_layerstream._measure as measure

    monkeypatch.setattr(measure, "run_child", lambda spec: pytest.fail("a system was run"))
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    assert main(["demo", "--dir", str(tmp_path / "work"), "--device", "cpu", *tiny, *extra]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "work" / "checkpoint" / "model.safetensors").exists()
    assert not (tmp_path / "work" / "shards").exists()


def test_a_demo_checkpoint_larger_than_the_free_disk_space_is_refused_before_it_is_written(
    tmp_path, monkeypatch, capsys
):
    """`demo --layers 100000 --hidden-size 8192` (43 TiB) wrote its checkpoint until the disk was full, then failed.
    Refused before anything is written, with the sizes, as the split refuses a shard directory that does not fit."""
    import hf_layerstream.demo as demo

    real = shutil.disk_usage
    monkeypatch.setattr(demo.shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 2**10))
    tiny = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "256"]
    assert main(["demo", "--dir", str(tmp_path / "work"), "--device", "cpu", *tiny]) == 2
    err = capsys.readouterr().err
    assert (
        f"Not enough disk space in {tmp_path / 'work' / 'checkpoint'} for the demo checkpoint: its weights take "
        in (err)
    )
    assert "and 100.0 KiB are free. Choose smaller sizes, or a folder on a disk with room; nothing was written" in err
    assert not (tmp_path / "work" / "checkpoint").exists()


def test_the_demo_checkpoint_is_written_a_shard_at_a_time(tmp_path, monkeypatch):
    """The demo model is never built: its weights are drawn and written one shard at a time (a checkpoint larger than
    RAM can be written), laid out as `save_pretrained` lays them out, loaded by `from_pretrained` with every weight
    present, and the same for the same seed."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    from hf_layerstream import demo

    monkeypatch.setattr(demo, "_SHARD_BYTES", 20_000)
    monkeypatch.setattr(demo, "_DRAW", 1000)  # (drawn in pieces)
    written = []
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        written.append(sum(t.nbytes for t in tensors.values()))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    sizes = {"layers": 2, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 200}
    ckpt = demo.write_demo_checkpoint(tmp_path / "a", **sizes)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(files) == len(written) > 3 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(written)
    embed = 200 * 64 * 2  # the embeddings and the head: each larger than a shard, each in a file of its own
    assert sorted(n for n in written if n > 20_000) == [embed, embed]
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert model.dtype == torch.bfloat16
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # (as `save_pretrained` records it)
    sd = model.state_dict()
    assert len(index["weight_map"]) == len(sd)
    norm = sd["model.norm.weight"].float()
    assert 0.8 < norm.mean() < 1.2 and 0.05 < norm.std() < 0.2  # 1 + N(0, 0.1)
    proj = sd["model.layers.1.mlp.up_proj.weight"].float()
    assert abs(proj.mean()) < 0.005 and 0.015 < proj.std() < 0.025  # N(0, 0.02)
    again = demo.write_demo_checkpoint(tmp_path / "b", **sizes)
    for name in files:
        assert (again / name).read_bytes() == (ckpt / name).read_bytes()


def test_a_demo_checkpoint_of_one_shard_is_one_model_safetensors(tmp_path):
    """As `save_pretrained` writes a checkpoint that fits one shard: `model.safetensors`, no index."""
    from transformers import AutoModelForCausalLM

    from hf_layerstream import demo

    sizes = {"layers": 1, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 200}
    ckpt = demo.write_demo_checkpoint(tmp_path / "a", **sizes)
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["model.safetensors"]
    assert not (ckpt / "model.safetensors.index.json").exists()
    _, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not any(info.values()), info


def test_errors_name_the_options_typed(split_dir, tmp_path, capsys):
    """A library error naming a Python argument (`dtype`, `prefetch`) names the command's option instead (`--dtype`,
    `--prefetch`): what the user of the command line typed. Positionals read the same either way."""
    ckpt, shards = split_dir
    # a dtype of another kind: named as typed, with the values taken (it said "got torch.int8", and to pass "a
    # floating-point torch.dtype or its name (e.g. torch.bfloat16 or 'bfloat16')", the API's words)
    for typed in ("int8", "bool", "torch.int64", "complex64"):
        assert main(["split", str(ckpt), str(tmp_path / "out"), "--dtype", typed, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"hf-layerstream split: error: `--dtype` {typed!r} is not a floating-point dtype: pass float32, bfloat16, "
            "float16 or float64 (for 8-bit or 4-bit weights, `--compression`).\n"
        ), err
    # a command without `--compression` (generate, inspect) names split's, where it said `compression`, an option of
    # none of them
    for command in (["generate", str(shards), "hi", "--device", "cpu"], ["inspect", str(shards)]):
        assert main([*command, "--dtype", "int8"]) == 2
        err = capsys.readouterr().err
        assert err.endswith("float16 or float64 (for 8-bit or 4-bit weights, `split --compression`).\n"), err
    # a float8 dtype: refused as plainly, before anything is written (it failed with "couldn't find storage object
    # Float8_e4m3fnStorage" after the lock and progress record were made, and the right split then needed --overwrite)
    assert main(["split", str(ckpt), str(tmp_path / "out"), "--dtype", "float8_e4m3fn", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: `--dtype` float8_e4m3fn is not a dtype a model is built at" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["split", str(ckpt), str(ckpt), "--quiet"]) == 2
    assert "error: `shard_dir` must differ from `source`" in capsys.readouterr().err
    assert main(["generate", str(shards), "hi", "--prefetch", "-1", "--device", "cpu"]) == 2
    assert "error: `--prefetch` must be a non-negative int, got -1" in capsys.readouterr().err
    # written as a call's argument (`quant_type='nf4'`): as the option, with its value
    assert main(["split", str(ckpt), str(tmp_path / "q"), "--quant-type", "fp4", "--blocksize", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    expected = "error: --quant-type 'fp4' and --blocksize 64 only apply to quantized shards; pass --compression '4bit'"
    assert expected in err, err
    assert main(["split", str(ckpt), str(tmp_path / "q"), "--compression", "8bit", "--quant-type", "fp4"]) == 2
    err = capsys.readouterr().err
    assert "error: `--quant-type` must be one of" in err and "got 'fp4'" in err, err
    assert "a 4-bit code: pass --compression '4bit' with it (or no `--quant-type`, for 8-bit's own)" in err, err
    # the library's names for an option's value (`generate_jsonl`'s `input_path`, `output_path`)
    assert (
        main(["generate", str(shards), "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")]) == 2
    )
    assert "error: `--input` " in capsys.readouterr().err


def test_paths_given_with_a_tilde_are_expanded_for_every_command(split_dir, tmp_path, monkeypatch, capsys):
    """`generate "~/m.layers"` (quoted: no shell expanded it) went to transformers as a hub repo id ("Repo id must
    use alphanumeric chars"), where `split`, `inspect` and `verify` expanded it; `--tokenizer` too."""
    ckpt, shards = split_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.layers").symlink_to(shards)
    (tmp_path / "tok").symlink_to(ckpt)
    prompt = _models.SAMPLE_PROMPTS[0]
    argv = ["generate", "~/m.layers", prompt, "--tokenizer", "~/tok", "--max-new-tokens", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out[len(prompt) :].strip() == _greedy_text(ckpt, prompt, 3).strip()


@pytest.mark.parametrize("closed", ["stdout", "stdin"])
def test_a_closed_standard_stream_is_no_traceback(split_dir, monkeypatch, capsys, closed):
    """Run with `>&-` or `<&-`, Python's `sys.stdout` / `sys.stdin` is `None`: `generate` failed with
    "'NoneType' object has no attribute 'flush'" (or 'read'). Without standard output it runs (nothing to print
    to); without standard input and no prompt argument, there is no prompt."""
    _, shards = split_dir
    argv = ["generate", str(shards), "--max-new-tokens", "2", "--device", "cpu"]
    monkeypatch.setattr(sys, closed, None)
    if closed == "stdout":
        assert main([*argv, _models.SAMPLE_PROMPTS[0]]) == 0
    else:
        assert main(argv) == 2
        assert "No prompt: pass it as an argument or on standard input." in capsys.readouterr().err


def test_a_prompt_from_a_terminal_is_asked_for_before_the_model_loads(split_dir, monkeypatch, capsys):
    """With no prompt argument and standard input a terminal, `generate` loaded the model and waited, silently. The
    prompt is read first now, with a line saying so; a missing one is refused before the model loads."""
    import hf_layerstream.cli as cli

    _, shards = split_dir

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    loads = []
    real = cli.load_streamed_model
    monkeypatch.setattr(cli, "load_streamed_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    argv = ["generate", str(shards), "--max-new-tokens", "2", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdin", Terminal("\n"))
    assert main(argv) == 2 and loads == []
    captured = capsys.readouterr()
    assert "Reading the prompt from standard input; end it with Ctrl-D." in captured.err and "No prompt" in captured.err
    monkeypatch.setattr(sys, "stdin", Terminal(_models.SAMPLE_PROMPTS[0] + "\n"))
    assert main(argv) == 0 and loads == [1]
    assert capsys.readouterr().out.startswith(_models.SAMPLE_PROMPTS[0])


@pytest.mark.parametrize(
    "option, least",
    [(["--layers", "0"], 1), (["--hidden-size", "0"], 1), (["--vocab-size", "-1"], 120), (["--vocab-size", "50"], 120)],
)
def test_demo_refuses_its_sizes_before_it_prints_a_step(tmp_path, capsys, option, least):
    """`demo --layers 0` printed "1. writing a random-weight Llama-shaped checkpoint (0 layers...)", then refused.
    A `--vocab-size` below the demo tokenizer's 120 tokens was raised to 120 without a word (the checkpoint was not of
    the size asked for): refused too, naming the least it takes."""
    assert main(["demo", "--dir", str(tmp_path / "d"), *option]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"`{option[0]}` is {option[1]}; use at least {least}" in captured.err, captured.err
    assert not (tmp_path / "d").exists()


def test_input_dash_reads_standard_input_and_output_dash_is_refused(split_dir, tmp_path, capsys):
    """`--input -` looked for a file named "-" ("does not exist"); it is standard input now, as for most commands.
    `--output -` wrote a file named "-" in the working folder: refused, since the results are read back to resume."""
    _, shards = split_dir
    lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(_models.SAMPLE_PROMPTS[:2]))
    (tmp_path / "in.jsonl").write_text(lines)
    common = ["--max-new-tokens", "3", "--device", "cpu"]
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "file.jsonl")]
    assert main([*argv, *common]) == 0
    piped = subprocess.run(
        [sys.executable, "-m", "hf_layerstream", "generate", str(shards), "--input", "-"]
        + ["--output", str(tmp_path / "piped.jsonl"), *common],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "piped.jsonl").read_text() == (tmp_path / "file.jsonl").read_text()
    assert len((tmp_path / "piped.jsonl").read_text().splitlines()) == 2
    assert "Reading the prompts" not in piped.stderr  # (from a pipe: nothing to say)
    capsys.readouterr()

    # from a terminal it waited silently once the model had loaded: a line says what it waits for, once the options
    # are checked (here the model's load is stopped, before anything is read)
    import hf_layerstream.cli as cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def stop(*args, **kwargs):
        raise ValueError("stopped before the load")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stdin", Terminal(""))
        m.setattr(cli, "load_streamed_model", stop)
        assert main(["generate", str(shards), "--input", "-", "--output", str(tmp_path), *common]) == 2
        assert "Reading the prompts" not in capsys.readouterr().err  # (the output, a folder, refused first)
        assert main(["generate", str(shards), "--input", "-", "--output", str(tmp_path / "t.jsonl"), *common]) == 2
    err = capsys.readouterr().err
    assert "Reading the prompts (JSONL, one per line) from standard input once the model has loaded; end them" in err
    assert "stopped before the load" in err and not (tmp_path / "t.jsonl").exists()
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", "-", *common]
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        assert main(argv) == 2
    assert "`--output` - (standard output) is not supported" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "`--input` {tmp}/missing.jsonl does not exist"),
        ("not-json", "in.jsonl:2 is not valid JSON"),
        ("output-folder", "`--output` {tmp} is not a regular file"),
        ("output-is-input", "is the input file; write results to another file"),
        ("batch-size-0", "`--batch-size` must be a positive int"),
    ],
    ids=["missing", "not-json", "output-folder", "output-is-input", "batch-size-0"],
)
def test_a_jsonl_job_is_refused_before_the_model_loads(split_dir, tmp_path, monkeypatch, capsys, case, message):
    """`generate --input` checked its files and batch size only once the model was loaded: for a hub shard
    directory, after its layers were downloaded (minutes, for a large model), it then said that the input file did
    not exist, or that line 2 was not JSON. Refused before the model loads now, as a missing prompt is."""
    import hf_layerstream.cli as cli

    _, shards = split_dir
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 1, "prompt": "Hello"}\n' + ('{"id": 2, "prompt": \n' if case == "not-json" else ""))
    if case == "missing":
        inp = tmp_path / "missing.jsonl"
    out = {"output-folder": tmp_path, "output-is-input": inp}.get(case, out)
    loads = []
    monkeypatch.setattr(cli, "load_streamed_model", lambda *a, **k: loads.append(1))
    argv = ["generate", str(shards), "--input", str(inp), "--output", str(out), "--device", "cpu"]
    assert main([*argv, *(["--batch-size", "0"] if case == "batch-size-0" else [])]) == 2
    err = capsys.readouterr().err
    assert loads == [] and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("tokens", ["0", "-1"])
def test_a_draft_size_below_one_is_refused_before_the_model_loads(split_dir, monkeypatch, capsys, tokens):
    """`--num-assistant-tokens 0` was refused by `configure_draft` only once the streamed model and the draft had
    loaded (for a hub shard directory, after its layers were downloaded). Refused first now, as `--max-new-tokens 0`
    is, in one line."""
    import hf_layerstream.cli as cli

    ckpt, shards = split_dir
    loads = []
    monkeypatch.setattr(cli, "load_streamed_model", lambda *a, **k: loads.append(1))
    argv = ["generate", str(shards), "hi", "--assistant", str(ckpt), "--num-assistant-tokens", tokens]
    assert main([*argv, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert loads == [] and out == ""
    assert err == (
        f"hf-layerstream generate: error: `--num-assistant-tokens` must be a positive number of tokens, got {tokens}.\n"
    )


def test_generate_with_a_draft_prints_no_deprecation_warning_of_transformers_own_draft_call(split_dir, capsys):
    """`--assistant` printed transformers' "Passing `generation_config` together with generation-related
    arguments=({'use_cache', 'max_new_tokens', 'min_new_tokens'}) is deprecated ..." in the middle of the text (after
    the prompt printed): transformers' candidate generator calls the draft's `generate` so, nothing the user passed or
    can change. Left out during the command (the text is the greedy one), and said again after it."""
    from transformers import GenerationConfig

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    warned = logging.getLogger("transformers.generation.utils")
    warned.addHandler(handler)
    ckpt, shards = split_dir
    try:
        logging.Logger.warning_once.cache_clear()  # (transformers says each message once a process)
        argv = ["generate", str(shards), "hi", "--assistant", str(ckpt), "--max-new-tokens", "4", "--device", "cpu"]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert out.startswith("hi") and out[2:].strip() == _greedy_text(ckpt, "hi", 4).strip(), (out, err)
        said = [r.getMessage() for r in records if "together with generation-related" in r.getMessage()]
        assert said == [], said
        assert "together with generation-related" not in err
        # (outside the command, transformers' own)
        logging.Logger.warning_once.cache_clear()
        model = _models.load_reference(ckpt, attn_implementation=None)
        ids = AutoTokenizer.from_pretrained(ckpt)("hi", return_tensors="pt")
        model.generate(**ids, generation_config=GenerationConfig(do_sample=False), max_new_tokens=1, pad_token_id=0)
        assert [r for r in records if "together with generation-related" in r.getMessage()], records
    finally:
        warned.removeHandler(handler)


@pytest.mark.parametrize("error", ["gpu", "cpu"])
def test_a_jsonl_job_out_of_memory_names_the_batch_size_in_one_line(split_dir, tmp_path, capsys, monkeypatch, error):
    """A batch too large for the memory (`--batch-size 64` on a GPU) ended `generate --input` in torch's traceback.
    It is one line now, naming the batch size and that a smaller one resumes the job (the batch size is not one of its
    settings), and the batches done before are kept: the same command with a smaller `--batch-size` finishes it."""
    from transformers.generation.utils import GenerationMixin

    _, shards = split_dir
    lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(_models.SAMPLE_PROMPTS[:3]))
    (tmp_path / "in.jsonl").write_text(lines)
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    argv += ["--max-new-tokens", "3", "--device", "cpu"]
    real = GenerationMixin.generate

    def generate(self, input_ids, **kwargs):
        if input_ids.shape[0] > 1:  # (a batch of one fits)
            if error == "gpu":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")
        return real(self, input_ids, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    assert main([*argv, "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-layerstream generate: error: Out of memory generating a batch of up to 2 prompts (")
    assert f"The results of the batches done are in {out}; run the same command with a smaller `--batch-size`" in err
    assert main([*argv, "--batch-size", "1"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2]
    capsys.readouterr()


@pytest.mark.parametrize("speculative", ["--assistant", "--prompt-lookup"])
def test_a_speculative_jsonl_job_out_of_memory_gives_advice_that_applies(
    split_dir, tmp_path, capsys, monkeypatch, speculative
):
    """`--assistant` and `--prompt-lookup` run one prompt per generate call, whatever `--batch-size`: out of memory,
    a job told to try a smaller `--batch-size`, which changes nothing. It names the one prompt at a time and the
    budgets (and a smaller draft); the prompts done are kept, and the same command finishes the job."""
    from transformers.generation.utils import GenerationMixin

    ckpt, shards = split_dir
    lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(_models.SAMPLE_PROMPTS[:3]))
    (tmp_path / "in.jsonl").write_text(lines)
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(shards), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    argv += ["--max-new-tokens", "3", "--device", "cpu", "--batch-size", "2"]
    argv += [speculative, str(ckpt) if speculative == "--assistant" else "2"]
    real, calls = GenerationMixin.generate, []

    def generate(self, input_ids, **kwargs):
        if kwargs.get("assistant_model") is None and kwargs.get("prompt_lookup_num_tokens") is None:
            return real(self, input_ids, **kwargs)  # (the draft's own calls)
        calls.append(input_ids.shape[0])
        if len(calls) == 2:  # (the first prompt done)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")
        return real(self, input_ids, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-layerstream generate: error: Out of memory generating one prompt (")
    assert f"speculative decoding (`{speculative}`) runs one prompt at a time, whatever `--batch-size`" in err
    assert f"The results of the prompts done are in {out}; run the command again with a lower budget" in err
    assert "smaller `--batch-size`" not in err
    assert ("a smaller draft model" in err) == (speculative == "--assistant")
    assert len(out.read_text().splitlines()) == 1 and calls == [1, 1]
    assert main(argv) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2]
    capsys.readouterr()


def test_max_memory_is_named_as_the_option_writes_it(split_dir, capsys, caplog):
    """The command line's messages wrote budgets as Python does: `max_memory['cpu'] = 1.0 KiB cannot hold ...` (in
    `inspect`'s warning line, its `--json` warning and `generate`'s logged warning) and `e.g. {0: '4GiB', 'cpu':
    '16GiB'}` for a key it does not know, where the user typed `--max-memory cpu=...`."""
    from hf_layerstream.cli import _OptionNames

    _, shards = split_dir
    assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", "gpu=1GiB"]) == 2
    err = capsys.readouterr().err
    assert "key 'gpu' is not recognized" in err and "e.g. 0=4GiB,cpu=16GiB." in err and "{" not in err
    assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", "cpu=1KiB"]) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning"))
    assert warning.startswith("warning          --max-memory cpu = 1.0 KiB cannot hold the resident parts")
    assert "max_memory[" not in warning and "with --prefetch 0 (" in warning
    # `--json` too: its warning wrote `max_memory['cpu'] = ...` and `prefetch=0`
    assert main(["inspect", str(shards), "--json", "--device", "cpu", "--max-memory", "cpu=1KiB"]) == 0
    warning = json.loads(capsys.readouterr().out)["warning"]
    assert warning.startswith("--max-memory cpu = 1.0 KiB cannot hold the resident parts"), warning
    assert "max_memory[" not in warning and "with --prefetch 0 (" in warning and "prefetch=" not in warning
    caplog.set_level(logging.INFO, logger="hf_layerstream")
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "1", "--device", "cpu", "--max-memory", "cpu=1KiB"]
    assert main(argv) == 0
    assert "--max-memory cpu = 1.0 KiB cannot hold" in caplog.text and "max_memory[" not in caplog.text
    assert "Pass `--prefetch` to choose it." in caplog.text  # (the INFO record of the prefetch lowered, `-v`)
    # the filter goes with the command: the library's records outside it are as the library wrote them
    assert not any(isinstance(f, _OptionNames) for h in logging.getLogger().handlers for f in h.filters)


def test_an_argument_and_its_value_in_backticks_are_named_as_the_option_writes_them(split_dir, capsys, caplog):
    """`generate --dequantize module` of full-precision shards warned "`dequantize='module'`: ... holds full-precision
    layers": the library's argument with its value, in backticks, stayed as Python writes it, where the argument alone
    (`` `dequantize` ``, `` `dequantize=` ``) or a value outside backticks (`quant_type='fp4'`) is written as the
    option. Written as the option now, `--dequantize 'module'`; the library's record names the argument."""
    _, shards = split_dir
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "1", "--device", "cpu", "--dequantize", "module"]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(argv) == 0
    warning = next(r.getMessage() for r in caplog.records if "holds full-precision layers" in r.getMessage())
    assert warning.startswith("`--dequantize 'module'`: ") and "dequantize=" not in warning, warning
    capsys.readouterr()


def test_a_traceback_quoted_in_a_record_keeps_its_source_lines():
    """`bench`'s warning for a failed row quotes its child's traceback; the command's names were written into its
    source lines too (`from_pretrained(spec["path"], dtype=dtype or "auto")` as `--dtype dtype or "auto"`). The
    message before the traceback is written with the options' names, the traceback as it is."""
    from hf_layerstream.cli import _OptionNames

    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in load\n'
        '    model = from_pretrained(path, dtype=dtype or "auto", max_memory=None)\nOSError: no file\n'
    )
    record = logging.LogRecord(
        "hf_layerstream.bench", logging.WARNING, __file__, 1, "%s failed (max_memory=%s):\n%s", None, None
    )
    record.args = ("in_memory", "{'cpu': 0}", traceback)
    assert _OptionNames(build_parser(), "bench").filter(record)
    assert record.getMessage() == f"in_memory failed (--max-memory cpu=0):\n{traceback}"


def test_a_gpu_budget_on_the_cpu_is_named_once_as_the_option_writes_it(split_dir, capsys, caplog):
    """`inspect --device cpu --max-memory 0=1GiB` warned "Pass --device 'cuda' (`--device cuda`) to stream on a
    GPU": the library's `device='cuda'`, written as the option, beside the option the message already named. The
    option is named once, as the command line writes it; the library's record names the argument."""
    _, shards = split_dir
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(["inspect", str(shards), "--device", "cpu", "--max-memory", "0=1GiB"]) == 0
    warning = next(r.getMessage() for r in caplog.records if "budget for GPU 0" in r.getMessage())
    assert warning.endswith("ignored. Pass --device 'cuda' to stream on a GPU."), warning
    assert warning.count("--device") == 1 and "device=" not in warning
    caplog.clear()
    from hf_layerstream.engine import plan_residency

    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        plan_residency(ShardDirectory(shards), torch.device("cpu"), max_memory={0: "1GiB"}, keep_in_page_cache=False)
    assert "Pass device='cuda' to stream on a GPU." in caplog.text and "--device" not in caplog.text


def test_a_blocksize_that_quantizes_nothing_names_the_option_once(split_dir, tmp_path, caplog):
    """`split --compression 8bit --blocksize 4096` of a small model warned "Pass a smaller `--blocksize`
    (`--blocksize`)": the library's message named the argument and the option, and the command line wrote the
    argument as the option too. The option is named once; the library's record names the argument."""
    ckpt, _ = split_dir
    argv = ["split", str(ckpt), str(tmp_path / "big"), "--compression", "8bit", "--blocksize", "4096", "--quiet"]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(argv) == 0
    warning = next(r.getMessage() for r in caplog.records if "quantizes none" in r.getMessage())
    assert warning.startswith("`--compression` 8-bit with blocks of 4096"), warning
    assert warning.endswith("Pass a smaller `--blocksize` to compress it."), warning
    from hf_layerstream import split_checkpoint

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, tmp_path / "api", compression="8bit", blocksize=4096, progress=False)
    assert "Pass a smaller `blocksize` to compress it." in caplog.text and "--blocksize" not in caplog.text


def test_inspect_keeps_its_labels_aligned_for_a_device_not_on_this_machine(split_dir, capsys):
    """`plan on cuda:0 (not on this machine)` ran past the 16 columns of the labels, the plan after it unaligned."""
    if torch.cuda.is_available():
        pytest.skip("plans for a GPU this machine lacks")
    _, shards = split_dir
    assert main(["inspect", str(shards), "--device", "cuda", "--max-memory", "0=1GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    plan = next(line for line in out if line.startswith("plan on"))
    assert plan.startswith("plan on cuda:0   (not on this machine) resident parts")
    assert all(line[16] == " " and line[17] != " " for line in out if line[:1].isalpha()), out


def test_a_closed_standard_stream_does_not_lend_its_number_to_a_file_the_command_opens(tmp_path):
    """Run with `2>&-`, file descriptor 2 was free: the first file the command opened took it (a layer file `split`
    writes, a results file), where whatever writes to standard error at the C level (torch's warnings, faulthandler)
    would have landed. A closed standard stream is now opened on /dev/null for the command's run."""
    script = f"""
import os, sys
import hf_layerstream.cli as cli
import hf_layerstream.split as split

def split_checkpoint(*args, **kwargs):  # (stands in for the split: opens a file as it does)
    fd = os.open({str(tmp_path / "opened")!r}, os.O_WRONLY | os.O_CREAT)
    os.write(1, f"fd={{fd}} stderr={{os.readlink('/proc/self/fd/2')}}\\n".encode())
    os.close(fd)
    return {str(tmp_path)!r}

split.split_checkpoint = split_checkpoint
sys.exit(cli.main(["split", "source", "dest", "--quiet"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(2)
    )
    assert done.returncode == 0, done.stdout
    fd, stderr = done.stdout.split("\n")[0].split(" ")
    assert fd != "fd=2" and stderr == f"stderr={os.devnull}" and "shard directory ready" in done.stdout


def test_generate_with_a_peft_adapter(split_dir, tmp_path, capsys, monkeypatch, caplog):
    """`--adapter DIR`: a LoRA adapter of the model, applied as the weights stream (`attaching_adapters`): the tokens
    are the loaded model's with the same adapter, every layer streamed; also from the hub cache at a revision
    (`--adapter-revision`). A folder that is not an adapter is refused before the model loads; a hub id that cannot be
    fetched is named so."""
    peft = pytest.importorskip("peft")
    ckpt, shards = split_dir
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "adapter")
    prompt, n = _models.SAMPLE_PROMPTS[0], 8
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = peft.PeftModel.from_pretrained(_models.load_reference(ckpt, attn_implementation=None), tmp_path / "adapter")
    out = ref.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=n, do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, -n:], skip_special_tokens=True)
    assert expected != _greedy_text(ckpt, prompt, n)  # (the adapter changes the output)
    argv = ["generate", str(shards), prompt, "--max-new-tokens", str(n), "--device", "cpu", "--max-memory", "cpu=0"]
    assert main([*argv, "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out[len(prompt) :].strip() == expected.strip()
    assert main([*argv, "--adapter", str(ckpt)]) == 2
    assert "without an adapter_config.json, not a PEFT adapter" in capsys.readouterr().err
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (a hub id, offline: named so, not "file not found")
    assert main([*argv, "--adapter", "someorg/some-lora"]) == 2
    err = capsys.readouterr().err
    assert "Cannot fetch adapter_config.json of 'someorg/some-lora': the hub cannot be reached" in err
    # a hub adapter at a revision (`--adapter-revision`), from the hub cache, which holds it only at that tag
    cache = tmp_path / "cache"
    files = {
        name: (tmp_path / "adapter" / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    _models.hub_cache(cache, "someorg/tagged-lora", files, ref="v1", commit="c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert main([*argv, "--adapter", "someorg/tagged-lora", "--adapter-revision", "v1"]) == 0
    assert capsys.readouterr().out[len(prompt) :].strip() == expected.strip()
    import huggingface_hub  # (`--token`: the adapter's files fetched with it too)

    tokens, real = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda *a, **k: tokens.append(k.get("token")) or real(*a, **k)
    )
    assert main([*argv, "--adapter", "someorg/tagged-lora", "--adapter-revision", "v1", "--token", "hf_secret"]) == 0
    out, err = capsys.readouterr()
    assert out[len(prompt) :].strip() == expected.strip()
    assert tokens and set(tokens) == {"hf_secret"}
    # (the local SHARD_DIR was read without it, but it served the adapter: it was said to be unused)
    assert "applies to hub repos" not in err + caplog.text
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", real)
    assert main([*argv, "--adapter", "someorg/tagged-lora"]) == 2  # (at main: not in the cache)
    assert "Cannot fetch adapter_config.json of 'someorg/tagged-lora': the hub" in capsys.readouterr().err
    assert main([*argv, "--adapter-revision", "v1"]) == 2
    assert "`--adapter-revision` only applies with `--adapter`" in capsys.readouterr().err
    # one adapter attached: given twice, refused (the last was taken, silently), pointing to `split`, which merges several
    assert main([*argv, "--adapter", str(tmp_path / "adapter"), "--adapter", "someorg/tagged-lora"]) == 2
    assert "`--adapter` given 2 times: `generate` attaches one adapter" in capsys.readouterr().err
    assert (
        main([*argv, "--adapter", "someorg/tagged-lora", "--adapter-revision", "v1", "--adapter-revision", "v2"]) == 2
    )
    assert "`--adapter-revision` given 2 times" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "someorg/shards", "--revision", ""],
        ["verify", "someorg/shards", "--revision", ""],
        ["generate", "someorg/shards", "hi", "--revision", ""],
        ["split", "someorg/checkpoint", "{out}", "--revision", ""],
        ["bench", "someorg/checkpoint", "--revision", ""],
        ["bench", "{out}", "--checkpoint", "someorg/checkpoint", "--checkpoint-revision", ""],
    ],
)
def test_an_empty_revision_is_refused(tmp_path, capsys, monkeypatch, argv):
    """`--revision ''` (a shell variable left unset, `--revision "$REV"`) was passed on as the revision '': offline it
    ended in "Cannot fetch manifest.json of 'someorg/shards' at revision '' ... (`hf download someorg/shards
    --revision `)", a command that does not run, and online in a URL with no revision. Refused first, naming the
    option and the fix, as an empty `--max-memory` is."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "shards").mkdir()  # (bench's SOURCE, a shard directory beside its --checkpoint: not looked at)
    argv = [a.replace("{out}", str(tmp_path / "shards")) for a in argv]
    option = argv[-2]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"hf-layerstream {argv[0]}: error: `{option}` is empty: give a branch, tag or commit of the hub repo, or leave "
        "the option out for its default branch.\n"
    )


@pytest.mark.parametrize(
    "argv, named",
    [
        (["split", "{ckpt}", ""], "SHARD_DIR"),
        (["split", "", "{out}"], "SOURCE"),
        (["split", "{ckpt}", "{out}", "--adapter", ""], "--adapter"),
        (["inspect", ""], "SHARD_DIR"),
        (["verify", ""], "SHARD_DIR"),
        (["generate", "", "hi"], "SHARD_DIR"),
        (["bench", ""], "SOURCE"),
        (["bench", "{shards}", "--checkpoint", ""], "--checkpoint"),
    ],
)
def test_an_empty_source_or_shard_directory_is_refused(split_dir, tmp_path, capsys, monkeypatch, argv, named):
    """`split CKPT ''` (a shell variable left unset, `split CKPT "$OUT"`) split into the current folder ('' is `.`),
    saying "shard directory ready: ."; `inspect ''`, `verify ''` and `generate '' hi` read the current folder as the
    shard directory, `split --adapter ''` it as the adapter, `bench --checkpoint ''` as the checkpoint. Each is
    refused, naming the argument, before anything is read or written."""
    ckpt, shards = split_dir
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    paths = {"{ckpt}": str(ckpt), "{out}": str(tmp_path / "out"), "{shards}": str(shards)}
    assert main([paths.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == f"hf-layerstream {argv[0]}: error: `{named}` is empty: pass a folder or a hub repo id.\n", err
    assert list(here.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_tokenizer_or_draft_that_does_not_load_is_named_by_its_option(split_dir, tmp_path, capsys, monkeypatch):
    """`--tokenizer` or `--assistant` given a hub id whose first file is in the hub cache but that does not load
    offline (its other files not there): the error was transformers' "We couldn't connect to
    'https://huggingface.co'...", naming neither the option nor the id. It names both."""
    from huggingface_hub import constants

    ckpt, shards = split_dir
    cache = tmp_path / "cache"
    _models.hub_cache(cache, "someorg/tok", {"tokenizer_config.json": (ckpt / "tokenizer_config.json").read_bytes()})
    _models.hub_cache(cache, "someorg/draft", {"config.json": (ckpt / "config.json").read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu"]
    for option, repo in (("--tokenizer", "someorg/tok"), ("--assistant", "someorg/draft")):
        assert main([*argv, option, repo]) == 2
        err = capsys.readouterr().err
        assert f"hf-layerstream generate: error: `{option}` {repo} did not load: " in err, err


@pytest.mark.parametrize("unreachable", ["offline", "no network"])
def test_a_hub_tokenizer_or_draft_that_cannot_be_fetched_is_refused_before_the_model_loads(
    split_dir, tmp_path, capsys, monkeypatch, unreachable
):
    """`--tokenizer gpt2` or `--assistant gpt2` with no network (HF_HUB_OFFLINE unset) and nothing of it in the hub
    cache: the model loaded first, then transformers tried the hub (the tokenizer two files, about 50 s of retries)
    and said "We couldn't connect to 'https://huggingface.co'... offline mode", where SHARD_DIR's hub repo is fetched
    first (its manifest: one round of retries) and named with the fix. Their first file is fetched as SHARD_DIR's is,
    before the model loads (a hub id at once, with the same message: which option, that no folder has that name,
    what to download). Here offline (HF_HUB_OFFLINE), and without network as huggingface_hub reports it (its
    retries left out); from the hub cache, a tokenizer loads as before."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    import hf_layerstream.cli as cli

    ckpt, shards = split_dir
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    if unreachable == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        reason = "offline, huggingface_hub.constants.HF_HUB_OFFLINE set"
    else:

        def no_network(*args, **kwargs):  # (what hf_hub_download raises once its retries failed)
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
        reason = "no network, or the hub is down"
    real_load = cli.load_streamed_model

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_streamed_model", load)
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu"]
    for option, first, what in (
        ("--tokenizer", "tokenizer_config.json", "tokenizer folder"),
        ("--assistant", "config.json", "draft model folder"),
    ):
        for repo in ("gpt2", "someorg/not-cached"):
            assert main([*argv, option, repo]) == 2
            err = capsys.readouterr().err
            assert err == (
                f"hf-layerstream generate: error: `{option}` {repo!r} is no local folder "
                f"({os.path.abspath(repo)} does not exist), and as a hub repo: Cannot fetch {first} of {repo!r}: the "
                f"hub cannot be reached ({reason}) and it is not in the hub cache. Download it once with network "
                f"access (`hf download {repo}`) or pass a local {what} as `{option}`.\n"
            ), err
    if unreachable == "offline":  # (in the hub cache: it loads, as before)
        files = {p.name: p.read_bytes() for p in ckpt.iterdir() if not p.name.endswith(".safetensors")}
        _models.hub_cache(cache, "someorg/tok", files)
        monkeypatch.setattr(cli, "load_streamed_model", real_load)
        assert main([*argv, "--tokenizer", "someorg/tok"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith("hi")


def _without_network(monkeypatch, cache, only: str | None = None) -> list[str]:
    """No network for the test (HF_HUB_OFFLINE unset): a host's name does not resolve (`only`'s, else every one),
    each lookup recorded in the list returned; the hub cache at `cache`, no hub host asked yet."""
    import socket

    from huggingface_hub import constants

    import hf_layerstream.split as split

    connections = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if only is not None and host != only:
            return real_getaddrinfo(host, *args, **kwargs)
        connections.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # (huggingface_hub's own request for its list of coding agents, once a process, with its telemetry: not counted)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(split, "_HUB_ANSWERS", {})  # (what the hub's hosts answered: none asked yet)
    return connections


def test_a_hub_id_without_network_fails_at_once_and_a_cached_repo_still_loads(split_dir, tmp_path, capsys, monkeypatch):
    """No network (HF_HUB_OFFLINE unset): a hub id not in the hub cache failed after about 27 s of huggingface_hub's
    retries (a first try, then 6 more with 1 + 2 + 4 + 8 + 8 s between them: 7 connections), for `split`, `generate`,
    `inspect`, `verify` and `bench`, and the split of a repo in the hub cache waited as long on the first file the
    repo lacks. One connection now finds the hub unreachable, the hub cache alone answers then, and the error is the
    one it was. The network is taken away here by name resolution failing for the hub's host (DNS), as without it."""
    import time

    import hf_layerstream.split as split

    ckpt, shards = split_dir
    connections = _without_network(monkeypatch, tmp_path / "cache", only="huggingface.co")
    monkeypatch.chdir(tmp_path)
    reason = "the hub cannot be reached (no network, or the hub is down) and it is not in the hub cache"
    commands = {
        "split": ["split", "someorg/llama", str(tmp_path / "out")],
        "generate": ["generate", "someorg/llama-layers", "hi", "--max-new-tokens", "1", "--device", "cpu"],
        "inspect": ["inspect", "someorg/llama-layers"],
        "verify": ["verify", "someorg/llama-layers"],
        "bench": ["bench", "someorg/llama", "--work", str(tmp_path / "w"), "--device", "cpu", "--modes", "warm"],
    }
    for command, argv in commands.items():
        split._HUB_ANSWERS.clear()
        connections.clear()
        start = time.monotonic()
        assert main(argv) == 2, command
        took = time.monotonic() - start
        err = capsys.readouterr().err
        assert reason in err, (command, err)
        assert connections == ["huggingface.co"], (command, len(connections))
        assert took < 10, (command, took)
    # in the hub cache: split from there, the files the repo lacks (its index, a tokenizer.model) taken as absent at
    # once, with no connection but the first
    _models.hub_snapshot(ckpt, tmp_path / "cache", repo="someorg--llama")
    split._HUB_ANSWERS.clear()
    connections.clear()
    start = time.monotonic()
    assert main(["split", "someorg/llama", str(tmp_path / "cached"), "--quiet"]) == 0, capsys.readouterr().err
    assert connections == ["huggingface.co"] and time.monotonic() - start < 20
    assert (tmp_path / "cached" / "manifest.json").is_file()


def test_a_hub_tokenizer_or_draft_in_the_hub_cache_loads_at_once_without_network(
    split_dir, tmp_path, capsys, monkeypatch
):
    """No network (HF_HUB_OFFLINE unset), `--tokenizer` and `--assistant` hub ids whose repos are in the hub cache:
    they loaded, after transformers had asked the hub for each file they may hold, each lookup of one the cache lacks
    retried by huggingface_hub for 23 s (about 2 minutes here). One connection finds the hub unreachable now, and
    transformers reads them from the cache alone (`local_files_only`), as offline."""
    import time

    ckpt, shards = split_dir
    connections = _without_network(monkeypatch, tmp_path / "cache")
    _models.hub_snapshot(ckpt, tmp_path / "cache", repo="someorg--draft")
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if not p.name.endswith(".safetensors")}
    _models.hub_cache(tmp_path / "cache", "someorg/tok", files)
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu"]
    start = time.monotonic()
    assert main([*argv, "--tokenizer", "someorg/tok", "--assistant", "someorg/draft"]) == 0, capsys.readouterr().err
    took = time.monotonic() - start
    assert capsys.readouterr().out.startswith("hi")
    assert connections == ["huggingface.co"] and took < 30, (connections, took)


@pytest.mark.parametrize(
    "options, option",
    [
        (["--tokenizer", ""], "--tokenizer"),
        (["--assistant", ""], "--assistant"),
        (["--adapter", ""], "--adapter"),
        (["--input", "", "--output", "{out}"], "--input"),
        (["--input", "{in}", "--output", ""], "--output"),
    ],
)
def test_generate_refuses_an_empty_file_or_model_option(split_dir, tmp_path, capsys, monkeypatch, options, option):
    """`generate --adapter ''` (a shell variable left unset, `--adapter "$LORA"`) ran the base model without a word,
    as if the option were not given; `--tokenizer ''` used the shard directory's tokenizer, `--assistant ''` decoded
    without a draft, `--input ''` was refused as "`--output` only applies with `--input`", where it was given, and
    `--output ''` as "`--input` needs `--output`". Each is refused before the model loads, naming the option."""
    import hf_layerstream.cli as cli

    _, shards = split_dir
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    options = [
        o.replace("{in}", str(tmp_path / "in.jsonl")).replace("{out}", str(tmp_path / "out.jsonl")) for o in options
    ]
    monkeypatch.setattr(cli, "load_streamed_model", lambda *a, **k: pytest.fail("the model was loaded"))
    prompt = [] if "--input" in options else ["hi"]
    assert main(["generate", str(shards), *prompt, *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-layerstream generate: error: `{option}` is empty: pass "), err
    assert err.rstrip().endswith("or leave the option out."), err


def test_a_tokenizer_folder_without_tokenizer_files_is_refused_before_the_model_loads(
    split_dir, tmp_path, capsys, monkeypatch
):
    """`--tokenizer` a folder holding no tokenizer file (an empty one, a checkpoint's config.json alone, a shard
    directory's `layers/`): transformers' error came once the model had loaded, over five lines about converting a
    slow tokenizer ("You need to have sentencepiece or tiktoken installed"). Refused first, in one line, exit 2; a
    tokenizer that fails to load otherwise (its tokenizer_config.json alone: those five lines) is said in one line."""
    import hf_layerstream.cli as cli

    ckpt, shards = split_dir
    empty, config_only = tmp_path / "empty", tmp_path / "config-only"
    empty.mkdir()
    config_only.mkdir()
    shutil.copy(ckpt / "config.json", config_only)

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as m:
        m.setattr(cli, "load_streamed_model", load)
        for folder in (empty, config_only, shards / "layers"):
            assert main(["generate", str(shards), "hi", "--tokenizer", str(folder)]) == 2, folder
            err = capsys.readouterr().err
            assert err == (
                f"hf-layerstream generate: error: `--tokenizer` {folder} is a folder without tokenizer files "
                "(tokenizer.json, tokenizer_config.json, a vocabulary): pass the folder or hub id of the model's "
                "tokenizer.\n"
            ), err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "1", "--device", "cpu", "--tokenizer", str(broken)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"hf-layerstream generate: error: `--tokenizer` {broken} did not load: ")
        and err.count("\n") == 1
    ), err


def test_generate_names_a_tokenizer_file_the_shard_directory_lacks(split_dir, tmp_path, capsys):
    """A shard directory whose tokenizer.json is gone (deleted, or a download of it cut short): the tokenizer failed
    to load without it (said as "holds no tokenizer that loads") or loaded and read the prompt as no tokens (a
    SentencePiece one), so `generate` said to give other text. It names the file missing and the fix, as `verify`
    does, or `--tokenizer`; exit code 2."""
    ckpt, shards = split_dir
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "tokenizer.json").unlink()
    assert main(["generate", str(copy), "Hello", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy / 'tokenizer.json'} is missing (a file of the tokenizer" in err
    assert "running the same split again writes it back; or give a tokenizer with `--tokenizer`" in err
    assert "no tokens" not in err
    argv = ["generate", str(copy), "Hello", "--max-new-tokens", "1", "--device", "cpu", "--tokenizer", str(ckpt)]
    assert main(argv) == 0


def test_generate_tells_the_tokenizer_files_by_their_names(split_dir, tmp_path, capsys):
    """`generate` told a tokenizer file gone by the text of its problem: in a folder whose path held "file of the
    tokenizer", a missing generation_config.json (which streaming runs without: it warns) was refused as one."""
    ckpt, shards = split_dir
    copy = tmp_path / "a file of the tokenizer" / "shards"
    shutil.copytree(shards, copy)
    (copy / "generation_config.json").unlink()
    assert main(["generate", str(copy), "Hello", "--max-new-tokens", "1", "--device", "cpu"]) == 0, capsys.readouterr()
    (copy / "tokenizer.json").unlink()
    assert main(["generate", str(copy), "Hello", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy / 'tokenizer.json'} is missing (a file of the tokenizer" in err
    assert "generation_config.json" not in err


def _beam_text(ckpt, prompt, n, num_beams):
    tok = AutoTokenizer.from_pretrained(ckpt)
    ref = _models.load_reference(ckpt, attn_implementation=None)
    ids = tok(prompt, return_tensors="pt")
    out = ref.generate(**ids, max_new_tokens=n, do_sample=False, num_beams=num_beams, pad_token_id=0)
    return tok.decode(out[0, ids["input_ids"].shape[-1] :], skip_special_tokens=True)


def test_generate_runs_a_generation_config_asking_for_beam_search(split_dir, tmp_path, capsys):
    """A shard directory whose generation_config.json asks for beam search (`num_beams` > 1): transformers refuses a
    streamer with it, and `generate` ended there ("`streamer` cannot be used with beam search (yet!). Make sure that
    `num_beams` is set to 1.", an option it has not). It generates the beams and prints the best one when done, saying
    so on stderr; several sequences asked for (`num_return_sequences`, which broke the streamer too) print one."""
    ckpt, shards = split_dir
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    prompt = _models.SAMPLE_PROMPTS[0]
    wanted = _beam_text(ckpt, prompt, 8, 3)
    assert wanted.strip() != _greedy_text(ckpt, prompt, 8).strip()  # (the premise: the beams are what is printed)
    for extra in ({"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}):
        (copy / "generation_config.json").write_text(json.dumps({**config, **extra}))
        assert main(["generate", str(copy), prompt, "--max-new-tokens", "8", "--device", "cpu"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith(prompt) and out[len(prompt) :].strip() == wanted.strip(), (out, err)
        assert "asks for beam search (`num_beams` 3), whose tokens cannot be printed as they come" in err
        assert ("asks for 2 sequences (`num_return_sequences`); one is generated" in err) == (len(extra) == 2)
    # (sampling beams: the streamer failed there, "TextStreamer only supports batch size 1")
    argv = ["generate", str(copy), prompt, "--max-new-tokens", "8", "--device", "cpu", "--do-sample", "--seed", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and "whose tokens cannot be printed as they come" in err


def _asking_for_beam_search(shards, tmp_path):
    """A copy of `shards` whose generation_config.json asks for beam search (`num_beams` 3), and a job file of one
    prompt, `tmp_path / "in.jsonl"`."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "num_beams": 3}))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    return copy


def test_sampling_options_without_sampling_name_beam_search_where_the_generation_config_asks_for_it(
    split_dir, tmp_path, capsys
):
    """`--temperature` without `--do-sample` was said to be ignored because "decoding is greedy" where the shard
    directory's generation_config.json asks for beam search (`num_beams` > 1): the decoding was beam search. The line
    names the decoding the generation config gives, in prompt and job modes; greedy where it asks for no beams."""
    ckpt, shards = split_dir
    copy = _asking_for_beam_search(shards, tmp_path)
    job = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    for mode in (["hi"], job):
        argv = ["generate", str(copy), *mode, "--max-new-tokens", "2", "--device", "cpu", "--temperature", "0.5"]
        assert main(argv) == 0
        err = capsys.readouterr().err
        ours = [line for line in err.splitlines() if "--do-sample" in line]
        assert ours == [
            "hf-layerstream generate: `--temperature` 0.5 is ignored without `--do-sample`: it applies only to "
            "sampling, and decoding is beam search (the generation config's `num_beams` 3); pass `--do-sample` to "
            "sample."
        ], err
    argv = ["generate", str(shards), "hi", "--max-new-tokens", "2", "--device", "cpu", "--temperature", "0.5"]
    assert main(argv) == 0
    assert "it applies only to sampling, and decoding is greedy; pass" in capsys.readouterr().err


def test_sampling_options_without_sampling_are_warned_about_before_the_model_loads(
    split_dir, tmp_path, capsys, monkeypatch
):
    """The line saying `--temperature` and the like are ignored without `--do-sample` was printed once the model had
    loaded (minutes, for a large one), as it named the decoding the generation config gives. A local shard directory's
    generation_config.json (`num_beams`) is read without loading the model: the line comes before the load, once,
    naming the decoding that runs, in prompt and job modes."""
    from hf_layerstream import cli

    ckpt, shards = split_dir
    copy = _asking_for_beam_search(shards, tmp_path)
    real, at_load = cli.load_streamed_model, []

    def load(*args, **kwargs):
        at_load.append(capsys.readouterr().err)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "load_streamed_model", load)
    greedy = "it applies only to sampling, and decoding is greedy; pass `--do-sample` to sample."
    beams = "it applies only to sampling, and decoding is beam search (the generation config's `num_beams` 3); pass"
    job = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    for folder, mode, wanted in ((shards, ["hi"], greedy), (copy, ["hi"], beams), (copy, job, beams)):
        (tmp_path / "out.jsonl").unlink(missing_ok=True)
        argv = ["generate", str(folder), *mode, "--max-new-tokens", "2", "--device", "cpu", "--temperature", "0.5"]
        assert main(argv) == 0
        after = capsys.readouterr().err
        assert wanted in at_load[-1], (at_load[-1], after)
        assert "--do-sample" not in after, after  # (said once)


def test_speculative_generate_prints_no_further_than_a_stop_string_inside_a_drafted_block(
    split_dir, tmp_path, capsys, monkeypatch
):
    """Speculative decoding (`--prompt-lookup`) adds a block of accepted draft tokens a step, which transformers puts
    to the streamer before it asks the stopping criteria, once, of the whole sequence: a stop string of the generation
    config (`stop_strings`) ending inside the block went unseen, and the text past it was printed (up to
    `--max-new-tokens`), where plain decoding stops. The text printed is plain decoding's, and the call ends at the
    step the stop string came in."""
    from transformers.generation.utils import GenerationMixin

    ckpt, shards = split_dir
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    # (" a" after " a": looked up in the text by prompt lookup, several a step; the stop string is not at the end of
    # the block it ends in, nor at the end of any later one)
    stop = "ay a a a a"
    (copy / "generation_config.json").write_text(json.dumps({**config, "stop_strings": [stop]}))
    prompt = _models.SAMPLE_PROMPTS[1]
    wanted = _greedy_text(ckpt, prompt, 16)
    assert stop in wanted and not wanted.endswith(stop)  # (the premise: plain decoding runs past it without it)
    real, generated = GenerationMixin.generate, []

    def generate(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        generated.append(out.shape[-1] - kwargs["input_ids"].shape[-1])
        return out

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    argv = ["generate", str(copy), prompt, "--max-new-tokens", "16", "--device", "cpu"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert plain == prompt + wanted[: wanted.index(stop) + len(stop)] + "\n"
    assert main([*argv, "--prompt-lookup", "16"]) == 0
    assert capsys.readouterr().out == plain
    # (the speculative call ended at the step the stop string came in, not at 16 tokens: with transformers 5.25 one
    # token past it, the end of its block; 5.15 stops at the stop string itself here, printing right without the wrapper)
    assert generated[0] <= generated[1] < 16, generated


def test_generate_input_runs_a_generation_config_asking_for_several_sequences(split_dir, tmp_path, capsys):
    """`generate --input` of a shard directory whose generation_config.json asks for several sequences
    (`num_return_sequences` 2) was refused by `generate_jsonl` ("`num_return_sequences` must be 1 ... (from the
    generation config)"), with no option to change it. As for one prompt, one sequence is generated for each prompt
    (the best beam), saying so on stderr."""
    ckpt, shards = split_dir
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "num_beams": 3, "num_return_sequences": 2}))
    prompts = _models.SAMPLE_PROMPTS[:2]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(copy), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    assert main([*argv, "--max-new-tokens", "4", "--device", "cpu"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "asks for 2 sequences (`num_return_sequences`); one is generated for each prompt" in err
    results = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["id"])
    assert [r["id"] for r in results] == [0, 1]
    for r, p in zip(results, prompts):
        assert r["completion"].strip() == _beam_text(ckpt, p, 4, 3).strip(), r
