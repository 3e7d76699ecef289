"""Batched generation: every prompt of a batch gets what it gets alone, JSONL jobs resume after a crash.

The streamed models read every layer from disk on every sweep (`max_memory={"cpu": 0}`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
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
from conftest import returns_within, streamed_model, tqdm_lock_held_elsewhere
from transformers import AutoTokenizer, GenerationConfig, LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from hf_layerstream.batch import _encode, generate_batch, generate_jsonl
from hf_layerstream.cli import main as cli_main
from hf_layerstream.speculative import SweepCounter

STREAM_ALL = {"max_memory": {"cpu": 0}}
GREEDY = {"max_new_tokens": 8, "do_sample": False}

# different lengths, so batches are left-padded; two end early on the tiny models
PROMPTS = [
    *_models.SAMPLE_PROMPTS,
    "Question: what is the capital of France?",
    "It was",
    "We can stream the layers of a model from the disk, one layer at a time.",
    "a",
    "Every morning the man would open the window",
]


@pytest.fixture(scope="module")
def llama(checkpoints):
    ckpt, shards = checkpoints("llama")
    return streamed_model(ckpt, shards, **STREAM_ALL), AutoTokenizer.from_pretrained(ckpt), shards


def _alone(model, tok, ids: list[int], **kw) -> list[int]:
    """Generate one prompt on its own (no padding); the new tokens, cut after the first end-of-sequence token."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), pad_token_id=tok.pad_token_id, **GREEDY, **kw)
    new = out[0, x.shape[1] :].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def _text(tok, new: list[int]) -> str:
    return tok.decode([t for t in new if t != tok.eos_token_id], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_equals_each_prompt_alone(checkpoints, arch):
    """Batched on the streamed model, each prompt gets what it gets alone on the loaded model."""
    ckpt, shards = checkpoints(arch)
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = PROMPTS if arch == "llama" else PROMPTS[:5]
    ref = _models.load_reference(ckpt)
    expected = [_text(tok, _alone(ref, tok, tok(p)["input_ids"])) for p in prompts]
    got = generate_batch(model, tok, prompts, batch_size=3, progress=False, **GREEDY)
    assert got == expected


def test_completions_keep_the_space_before_the_first_new_word(checkpoints, tmp_path):
    """With a SentencePiece tokenizer (Llama-2's, Mistral's), new tokens decoded on their own lose the first one's
    leading space: a completion read " is it" as "is it", glued to its prompt when the two are joined. A completion is
    what the new tokens add to the decoded prompt, so that prompt + completion is the whole sequence's text; in the
    JSONL job too."""
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, **STREAM_ALL)
    tok = AutoTokenizer.from_pretrained(_models.save_metaspace_tokenizer(tmp_path / "tokenizer"))
    prompts = ["is it", "we can stream the layers", "a"]
    got = generate_batch(model, tok, prompts, batch_size=2, progress=False, **GREEDY)
    ref = _models.load_reference(ckpt)
    expected = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        new = _alone(ref, tok, ids)
        whole = tok.decode(ids + new, skip_special_tokens=True)
        expected.append(whole[len(tok.decode(ids, skip_special_tokens=True)) :])
        assert prompt + expected[-1] == whole
    assert got == expected
    # (the premise: some completion begins with a new word, which decoded alone loses its space)
    assert any(
        text.startswith(" ") and not _text(tok, _alone(ref, tok, tok(p)["input_ids"])).startswith(" ")
        for p, text in zip(prompts, got)
    )
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=2, progress=False, **GREEDY)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in lines] == got


def test_batch_without_a_bar_never_takes_tqdm_lock(llama):
    """`progress=False` builds no tqdm bar: a disabled one still takes tqdm's global lock, which a process may find
    held forever (a forked relative killed while holding it; see tests/test_crash_safety.py)."""
    model, tok, _ = llama
    expected = [_text(tok, _alone(model, tok, tok(p)["input_ids"])) for p in PROMPTS[:2]]
    with tqdm_lock_held_elsewhere():
        got = returns_within(60, generate_batch, model, tok, PROMPTS[:2], progress=False, **GREEDY)
    assert got == expected


def test_chat_with_a_tokenizer_without_a_template_is_said(llama, tmp_path, caplog):
    """`chat=True` with a tokenizer that has no chat template tokenized the prompts as they are, without a word (the
    command line's `--chat` says it): a warning says so and names the fix; the results are those of `chat=False`."""
    model, tok, _ = llama
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    expected = generate_batch(model, plain, ["Hello"], progress=False, **GREEDY)
    assert "chat template" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        assert generate_batch(model, plain, ["Hello"], chat=True, progress=False, **GREEDY) == expected
    assert "`chat=True`, but the tokenizer" in caplog.text and "has no chat template" in caplog.text
    caplog.clear()
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": "Hello"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        generate_jsonl(model, plain, inp, tmp_path / "out.jsonl", chat=True, progress=False, **GREEDY)
    assert "`chat=True`, but the tokenizer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        generate_batch(model, tok, ["Hello"], chat=True, progress=False, **GREEDY)  # (a tokenizer with one)
    assert "chat template" not in caplog.text


def test_chat_template_and_messages(llama, checkpoints):
    """Conversations and chat-templated prompts, batched on the streamed model, get what each gets alone on the
    loaded model."""
    model, tok, _ = llama
    ref = _models.load_reference(checkpoints("llama")[0])
    assert tok.chat_template
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    prompts = ["Hello, how are you?", conversation]
    got = generate_batch(model, tok, prompts, batch_size=2, chat=True, progress=False, **GREEDY)
    expected = []
    for messages in ([{"role": "user", "content": prompts[0]}], conversation):
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        expected.append(_text(tok, _alone(ref, tok, list(ids))))
    assert got == expected
    # chat=False leaves plain text alone
    assert generate_batch(model, tok, prompts[:1], progress=False, **GREEDY) == [
        _text(tok, _alone(ref, tok, tok(prompts[0])["input_ids"]))
    ]


def test_a_conversation_ending_with_an_assistant_turn_is_continued_as_the_pipeline_does(llama, checkpoints):
    """A conversation whose last message is the assistant's is a prefill: its reply continues that message, as
    `pipeline("text-generation")` renders it, not a new assistant turn after it."""
    from transformers import pipeline

    model, tok, _ = llama
    ref = _models.load_reference(checkpoints("llama")[0])
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    got = generate_batch(model, tok, [prefill], progress=False, **GREEDY)
    generator = pipeline("text-generation", model=ref, tokenizer=tok)
    text = generator(prefill, return_full_text=False, pad_token_id=tok.pad_token_id, **GREEDY)[0]["generated_text"]
    ids = tok.apply_chat_template(prefill, continue_final_message=True, return_dict=True)["input_ids"]
    assert got == [text] == [_text(tok, _alone(ref, tok, list(ids)))]
    # the prompt is the pipeline's (the tiny model's reply alone may not tell the two renderings apart)
    assert _encode(tok, prefill, chat=True) == list(ids)
    assert list(ids) != list(
        tok.apply_chat_template(prefill, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def test_a_job_continuing_assistant_turns_refuses_results_rendered_as_new_turns(llama, tmp_path, monkeypatch):
    """Results that an older hf_layerstream wrote for a job with a conversation ending in an assistant turn rendered it
    followed by a new turn: resumed now (which continues the turn), they would mix two renderings unnoticed. Such a
    job's settings say so, and those results are refused. A template that cannot continue a turn names the prompt."""
    import hf_layerstream.batch as batch

    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    inp.write_text(json.dumps({"id": "p", "messages": prefill}) + "\n" + json.dumps({"id": "q", "prompt": "Hi"}) + "\n")
    real = batch._settings_digest
    with monkeypatch.context() as m:  # (the fingerprint an older hf_layerstream gave it)
        m.setattr(batch, "_settings_digest", lambda *a, prefill=False, **k: real(*a, **k))
        generate_jsonl(model, tok, inp, out, progress=False, **GREEDY)
    written = out.read_text()
    with pytest.raises(ValueError, match="made with other settings than this run's"):
        generate_jsonl(model, tok, inp, out, progress=False, **GREEDY)
    assert out.read_text() == written
    # a job without such a conversation keeps its fingerprint (results written before still resume)
    assert (
        real(tok, False, model.generation_config, GREEDY)
        == real(tok, False, model.generation_config, GREEDY, prefill=False)
        != real(tok, False, model.generation_config, GREEDY, prefill=True)
    )
    # a template that drops the message contents cannot continue one: the error names the prompt
    tok_without = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok_without.chat_template = "{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}"
    with pytest.raises(ValueError, match=r"Prompt 0 could not be rendered and tokenized: ValueError"):
        generate_batch(model, tok_without, [prefill], progress=False, **GREEDY)


def test_a_job_refused_before_it_generates_leaves_no_file_of_its_own(llama, tmp_path):
    """A job refused by a check of its prompts made once its output file was open (a conversation the chat template
    cannot render, here) left that file behind, empty, and the folders made for it. What the job created is removed;
    an output file that was there before is kept, empty or not."""
    model, tok, _ = llama
    tok_without = AutoTokenizer.from_pretrained(tok.name_or_path)  # (a template that cannot continue a turn)
    tok_without.chat_template = "{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}"
    prefill = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "q", "prompt": "Hi"}) + "\n" + json.dumps({"id": "p", "messages": prefill}) + "\n")
    refused = r"Prompt 'p' could not be rendered and tokenized"
    with pytest.raises(ValueError, match=refused):
        generate_jsonl(model, tok_without, inp, tmp_path / "new" / "folder" / "out.jsonl", progress=False, **GREEDY)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "out.jsonl"
    out.touch()
    with pytest.raises(ValueError, match=refused):
        generate_jsonl(model, tok_without, inp, out, progress=False, **GREEDY)
    assert out.exists() and out.read_bytes() == b""


def _write_input(path: Path) -> list:
    lines = [
        {"id": "a", "prompt": PROMPTS[0]},
        PROMPTS[1],  # a bare string: its id is its position, 1
        {"id": 7, "messages": [{"role": "user", "content": PROMPTS[2]}]},
        {"prompt": PROMPTS[3]},  # no id: position 3
        {"id": "e", "prompt": PROMPTS[4]},
        {"id": "f", "prompt": PROMPTS[5]},
        {"id": "g", "prompt": PROMPTS[6]},
        {"id": "h", "prompt": PROMPTS[7]},
    ]
    path.write_text(
        "\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    )
    return ["a", 1, 7, 3, "e", "f", "g", "h"]


def test_jsonl_schema_order_and_stats(llama, tmp_path):
    model, tok, _ = llama
    ids = _write_input(tmp_path / "in.jsonl")
    stats = generate_jsonl(
        model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=4, progress=False, **GREEDY
    )
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids  # input order, though batches ran longest first
    texts = generate_batch(
        model,
        tok,
        [PROMPTS[0], PROMPTS[1], [{"role": "user", "content": PROMPTS[2]}], *PROMPTS[3:]],
        progress=False,
        **GREEDY,
    )
    assert [r["completion"] for r in records] == texts
    for r in records:
        assert set(r) == {
            "id",
            "completion",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "prompt_sha256",
            "settings_sha256",
            "model_sha256",
        }
        assert r["finish_reason"] in ("stop", "length")
        assert r["completion_tokens"] == GREEDY["max_new_tokens"] or r["finish_reason"] == "stop"
    assert stats["prompts"] == 8 and stats["generated"] == 8 and stats["skipped"] == 0 and stats["batches"] == 2
    assert stats["tokens"] == sum(r["completion_tokens"] for r in records)
    # two batches of four, every step one sweep: up to 4 tokens per sweep
    assert stats["sweeps"] <= 2 * GREEDY["max_new_tokens"]
    assert 2.0 < stats["tokens_per_sweep"] <= 4.0
    # a rerun has nothing to do and leaves the file as it is
    before = (tmp_path / "out.jsonl").read_bytes()
    again = generate_jsonl(
        model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=4, progress=False, **GREEDY
    )
    assert again["skipped"] == 8 and again["generated"] == 0 and again["sweeps"] == 0
    assert (tmp_path / "out.jsonl").read_bytes() == before


_CHILD = """
import os, sys, time
import transformers.generation.utils as gu

marker, argv = sys.argv[1], sys.argv[2:]
original = gu.GenerationMixin.generate
calls = [0]

def generate(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # two batches are written: stop here until killed
        open(marker, "w").close()
        time.sleep(600)
    return original(self, *args, **kwargs)

gu.GenerationMixin.generate = generate
from hf_layerstream.cli import main
sys.exit(main(argv))
"""


def test_resume_after_sigkill(llama, tmp_path, capsys):
    _, _, shards = llama
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS + [p + " And then" for p in PROMPTS[:4]])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    args = [
        "generate",
        str(shards),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "8",
    ]
    args += ["--max-memory", "cpu=0", "--device", "cpu"]
    out = tmp_path / "out.jsonl"
    (tmp_path / "child.py").write_text(_CHILD)
    marker = tmp_path / "two-batches-written"
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(marker), *args, "--output", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the batch job ended before it was killed:\n{child.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the batch job did not reach its third batch in 120 s")
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    written = out.read_bytes()
    assert written.endswith(b"\n") and len(written.splitlines()) == 6  # two batches of three, flushed
    with open(out, "ab") as f:  # and a torn line, as a crash in the middle of a write leaves
        f.write(b'{"id": "p3", "completion": "The q')

    assert cli_main([*args, "--output", str(out)]) == 0
    resumed = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert resumed["skipped"] == 6 and resumed["generated"] == len(prompts) - 6 and resumed["repaired"] is True

    assert cli_main([*args, "--output", str(tmp_path / "straight.jsonl")]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [p["id"] for p in prompts]  # every prompt exactly once, in input order
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


def test_resume_refuses_other_input(llama, tmp_path):
    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "Goodbye"}) + "\n")
    with pytest.raises(ValueError, match="prompt differs"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 2, "prompt": "Hello"}) + "\n")
    with pytest.raises(ValueError, match="not in the input"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    import fcntl

    with open(tmp_path / "out.jsonl", "ab") as held:  # another job holds the file
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="being written by another running job"):
            generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "comp\n{"id": 2, "completion": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a result line"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "bad.jsonl", progress=False, max_new_tokens=2)


def test_a_seed_out_of_torchs_range_is_refused_naming_it_before_the_output_is_made(llama, tmp_path):
    """`torch.manual_seed` takes -2**63 to 2**64 - 1: `seed=2**64` failed with torch's "Overflow when unpacking long
    long", naming no argument, after the output file was created; `generate --seed` refused it naming the range."""
    model, tok, _ = llama
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": PROMPTS[0]}) + "\n")
    sampled = {"max_new_tokens": 2, "do_sample": True, "top_k": 0}
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"`seed` {seed} is out of range: use a whole number from -{2**63} to"):
            generate_jsonl(model, tok, inp, tmp_path / "out.jsonl", seed=seed, progress=False, **sampled)
        assert not (tmp_path / "out.jsonl").exists()
    for seed in (2**64 - 1, -(2**63)):  # (the ends of the range are taken)
        generate_jsonl(model, tok, inp, tmp_path / f"{seed}.jsonl", seed=seed, progress=False, **sampled)


def test_generate_batch_takes_a_seed_as_generate_jsonl_does(llama, tmp_path):
    """`generate_jsonl` takes `seed` (torch seeded before the first batch); `generate_batch(..., seed=3)` passed it on
    to `model.generate`, which failed with transformers' "model_kwargs are not used by the model: ['seed']". It
    seeds torch the same way: the same seed, the same samples (those of a `generate_jsonl` job with it), checked as
    `generate_jsonl` checks it."""
    model, tok, _ = llama
    sampled = {"max_new_tokens": 4, "do_sample": True, "top_k": 0}
    first = generate_batch(model, tok, PROMPTS[:3], batch_size=2, seed=3, progress=False, **sampled)
    assert generate_batch(model, tok, PROMPTS[:3], batch_size=2, seed=3, progress=False, **sampled) == first
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    generate_jsonl(model, tok, inp, tmp_path / "out.jsonl", batch_size=2, seed=3, progress=False, **sampled)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["completion"] for line in lines] == first
    with pytest.raises(ValueError, match=rf"`seed` {2**64} is out of range: use a whole number from"):
        generate_batch(model, tok, PROMPTS[:1], seed=2**64, progress=False, **sampled)
    with pytest.raises(TypeError, match="`seed` must be an int or None, got '3'"):
        generate_batch(model, tok, PROMPTS[:1], seed="3", progress=False, **sampled)


def test_numpy_integers_are_taken_as_batch_size_and_seed(llama, tmp_path):
    """`prefetch`, `max_memory`'s sizes, `blocksize` and `measure_sweeps`' `max_new_tokens` take NumPy's integers (a
    value from an array, a sweep over `np.arange`); `batch_size` and `seed` refused them, saying they must be an int
    ("got np.int64(2)"). They are taken as Python's: the same completions, and the seed, in the job's settings, the
    same (a resume with Python's takes the results)."""
    import numpy as np

    model, tok, _ = llama
    expected = generate_batch(model, tok, PROMPTS[:3], batch_size=2, progress=False, **GREEDY)
    assert generate_batch(model, tok, PROMPTS[:3], batch_size=np.int64(2), progress=False, **GREEDY) == expected
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    sampled = {"max_new_tokens": 3, "do_sample": True, "top_k": 0}
    generate_jsonl(
        model, tok, inp, tmp_path / "np.jsonl", batch_size=np.int32(2), seed=np.int64(7), progress=False, **sampled
    )
    generate_jsonl(model, tok, inp, tmp_path / "py.jsonl", batch_size=2, seed=7, progress=False, **sampled)
    assert (tmp_path / "np.jsonl").read_text() == (tmp_path / "py.jsonl").read_text()
    stats = generate_jsonl(model, tok, inp, tmp_path / "np.jsonl", seed=7, progress=False, **sampled)
    assert stats["skipped"] == 3
    for value in (np.float64(2.0), np.bool_(True)):  # (not integers: still refused)
        with pytest.raises(TypeError, match="`batch_size` must be a positive int"):
            generate_batch(model, tok, PROMPTS[:1], batch_size=value, progress=False, **GREEDY)
        with pytest.raises(TypeError, match="`seed` must be an int or None"):
            generate_jsonl(model, tok, inp, tmp_path / "x.jsonl", seed=value, progress=False, **sampled)


def test_user_errors(llama, tmp_path):
    model, tok, shards = llama
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        generate_batch(model, tok, ["Hi"], batch_size=0)
    with pytest.raises(ValueError, match="`streamer` cannot be passed"):
        generate_batch(model, tok, ["Hi"], streamer=object())
    with pytest.raises(ValueError, match="`num_return_sequences` must be 1"):
        generate_batch(model, tok, ["Hi"], num_return_sequences=2)
    with pytest.raises(TypeError, match="wrap it"):
        generate_batch(model, tok, "Hi")
    # (a dict was taken as its keys: {"q1": "What is...", "q2": ...} generated completions of "q1" and "q2", without a
    # word; None and an int failed in Python, "'NoneType' object is not iterable")
    with pytest.raises(TypeError, match=r"^`prompts` is a dict: .*`list\(prompts.values\(\)\)`.*generate_jsonl"):
        generate_batch(model, tok, {"q1": "Hi", "q2": "It was"}, progress=False)
    for value in (None, 5):
        with pytest.raises(TypeError, match=rf"^`prompts` must be a list of prompts, got {type(value).__name__}\.$"):
            generate_batch(model, tok, value, progress=False)
        # (failed in pathlib, naming neither: "expected str, bytes or os.PathLike object, not NoneType")
        name = type(value).__name__
        with pytest.raises(TypeError, match=rf"^`input_path` must be a str or os.PathLike, got {name}\.$"):
            generate_jsonl(model, tok, value, tmp_path / "o.jsonl", progress=False)
        with pytest.raises(TypeError, match=rf"^`output_path` must be a str or os.PathLike, got {name}\.$"):
            generate_jsonl(model, tok, tmp_path / "o.jsonl", value, progress=False)
    # (something else than a model, or a tokenizer, failed deep inside: "'NoneType' object has no attribute 'config'",
    # or blamed the prompt, "Prompt 0 could not be rendered and tokenized: TypeError: 'str' object is not callable")
    (tmp_path / "one.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    for not_a_model in (None, str(shards), tok):
        name = type(not_a_model).__name__
        with pytest.raises(TypeError, match=rf"^`model` must be a transformers model with `generate`.*, got {name}\.$"):
            generate_batch(not_a_model, tok, ["Hi"], progress=False)
        with pytest.raises(TypeError, match=rf"^`model` must be a transformers model with `generate`.*, got {name}\.$"):
            generate_jsonl(not_a_model, tok, tmp_path / "one.jsonl", tmp_path / "none.jsonl", progress=False)
    for not_a_tokenizer in (None, str(shards)):
        name = type(not_a_tokenizer).__name__
        with pytest.raises(TypeError, match=rf"^`tokenizer` must be the model's tokenizer .*, got {name}\.$"):
            generate_batch(model, not_a_tokenizer, ["Hi"], progress=False)
        with pytest.raises(TypeError, match=rf"^`tokenizer` must be the model's tokenizer .*, got {name}\.$"):
            generate_jsonl(model, not_a_tokenizer, tmp_path / "one.jsonl", tmp_path / "none.jsonl", progress=False)
    assert not (tmp_path / "none.jsonl").exists()
    # (the on/off options take True or False: `chat="no"`, a string, truthy, rendered every prompt as a chat, and
    # `generate_jsonl` recorded its results under those settings)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    for name in ("chat", "progress"):
        with pytest.raises(TypeError, match=rf"^`{name}` must be True or False, got 'no'\.$"):
            generate_batch(model, tok, ["Hi"], **{name: "no"})
        with pytest.raises(TypeError, match=rf"^`{name}` must be True or False, got None\.$"):
            generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "flag.jsonl", **{name: None})
        assert not (tmp_path / "flag.jsonl").exists()
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"dup.jsonl:2: id 1 is already the id of line 1;"):
        generate_jsonl(model, tok, tmp_path / "dup.jsonl", tmp_path / "o.jsonl", progress=False)
    # a line without an id has its position (from 0) as its id, which the message names (it said "id 1 already used
    # by prompt 0" of a line with no id written, against an earlier line's explicit 1); blank lines do not count
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "prompt": "a"}\n\n"b"\n')
    with pytest.raises(
        ValueError, match=r"dup.jsonl:3: id 1 \(its position: it has no 'id'\) is already the id of line 1;"
    ):
        generate_jsonl(model, tok, tmp_path / "dup.jsonl", tmp_path / "o.jsonl", progress=False)
    (tmp_path / "dup.jsonl").write_text('"a"\n{"id": 0, "prompt": "b"}\n')
    with pytest.raises(
        ValueError, match=r"dup.jsonl:2: id 0 is already the id of line 1 \(its position: it has no 'id'\);"
    ):
        generate_jsonl(model, tok, tmp_path / "dup.jsonl", tmp_path / "o.jsonl", progress=False)
    # a line that is not UTF-8: named (it was the codec's message alone, naming neither file nor line)
    (tmp_path / "latin.jsonl").write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2 is not UTF-8 text \(invalid continuation byte at byte 24\)"):
        generate_jsonl(model, tok, tmp_path / "latin.jsonl", tmp_path / "o.jsonl", progress=False)
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "a"}\n')  # (a byte-order mark: read)
    stats = generate_jsonl(model, tok, tmp_path / "bom.jsonl", tmp_path / "b.jsonl", progress=False, max_new_tokens=2)
    assert stats["generated"] == 1 and json.loads((tmp_path / "b.jsonl").read_text())["id"] == 1
    (tmp_path / "schema.jsonl").write_text('{"id": 1, "text": "a"}\n')
    with pytest.raises(ValueError, match=r"schema.jsonl:1 has neither a string 'prompt' nor 'messages'"):
        generate_jsonl(model, tok, tmp_path / "schema.jsonl", tmp_path / "o.jsonl", progress=False)
    # both: the prompt was ignored without a word (the messages were rendered)
    (tmp_path / "both.jsonl").write_text('{"id": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(ValueError, match=r"both.jsonl:1 has both 'prompt' and 'messages'"):
        generate_jsonl(model, tok, tmp_path / "both.jsonl", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(FileNotFoundError, match="`input_path`"):
        generate_jsonl(model, tok, tmp_path / "missing.jsonl", tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_symlinked_output_file_is_rewritten_in_order_where_it_points(llama, tmp_path):
    """Results are appended through the link, to its target; the final rewrite in input order goes there too, and the
    target keeps its permissions (the rename replaced the link with a file, and left the target in batch order)."""
    model, tok, _ = llama
    ids = _write_input(tmp_path / "in.jsonl")
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "results.jsonl"
    target.touch(mode=0o600)
    target.chmod(0o600)
    (tmp_path / "out.jsonl").symlink_to(target)
    generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=4, progress=False, **GREEDY)
    assert (tmp_path / "out.jsonl").is_symlink()
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == ids
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_prompts_from_a_pipe_and_results_only_to_a_regular_file(llama, tmp_path):
    """The input is read once, so a pipe serves (`--input /dev/stdin`, `<(...)`): the same results as from a file.
    The results are read back and rewritten in input order, so they must go to a regular file: a pipe
    (`/dev/stdout`) waited forever for the read-back, `/dev/null` failed after its first batch; both are refused
    before anything is generated, as is a directory for the input."""
    import threading

    model, tok, _ = llama
    ids = _write_input(tmp_path / "in.jsonl")
    generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "want.jsonl", batch_size=4, progress=False, **GREEDY)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "in.jsonl").read_bytes()))
    writer.start()
    stats = generate_jsonl(model, tok, fifo, tmp_path / "out.jsonl", batch_size=4, progress=False, **GREEDY)
    writer.join()
    assert stats["prompts"] == len(ids)
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "want.jsonl").read_text()
    out_fifo = tmp_path / "out.fifo"
    os.mkfifo(out_fifo)
    for output in (out_fifo, Path(os.devnull)):
        with pytest.raises(ValueError, match="is not a regular file: the results are read back"):
            generate_jsonl(model, tok, tmp_path / "in.jsonl", output, progress=False, **GREEDY)
    with pytest.raises(ValueError, match="`input_path` .* is a directory"):
        generate_jsonl(model, tok, tmp_path, tmp_path / "o.jsonl", progress=False, **GREEDY)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_jsonl_file_with_a_byte_order_mark_is_read(llama, tmp_path):
    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": 1, "prompt": "Hello"}).encode() + b"\n")
    stats = generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    assert stats["generated"] == 1
    assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == 1


def _reference_alone(ref, tok, prompt: str, config: GenerationConfig) -> str:
    x = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return _text(tok, out[0, x.shape[1] :].tolist())


def test_the_generation_config_is_checked_as_keyword_arguments_are(llama, checkpoints, caplog):
    """Settings given through `generation_config=` (or the model's own config) are the settings `generate` runs with:
    they ask for one sequence per prompt, take no streamer under beam search, and run one prompt per call when
    speculating, as the same settings given as keyword arguments do."""
    model, tok, _ = llama
    ref = _models.load_reference(checkpoints("llama")[0])
    prompts = PROMPTS[:6]
    with pytest.raises(ValueError, match=r"`num_return_sequences` must be 1 .*\(from the `generation_config` given\)"):
        generate_batch(
            model,
            tok,
            prompts,
            batch_size=3,
            progress=False,
            generation_config=GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=2),
        )
    beams = GenerationConfig(max_new_tokens=6, num_beams=2)
    got = generate_batch(model, tok, prompts, batch_size=3, progress=False, generation_config=beams)
    alone = GenerationConfig(
        max_new_tokens=6, num_beams=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    assert got == [_reference_alone(ref, tok, p, alone) for p in prompts]

    greedy = GenerationConfig(**GREEDY, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = [_reference_alone(ref, tok, p, greedy) for p in prompts]
    lookup = GenerationConfig(**GREEDY, prompt_lookup_num_tokens=3)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        assert generate_batch(model, tok, prompts, batch_size=3, progress=False, generation_config=lookup) == expected
    assert "`prompt_lookup_num_tokens`: transformers' speculative decoding" in caplog.text
    assert "using batch_size=1 instead of 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        got = generate_batch(model, tok, prompts, batch_size=3, progress=False, assistant_early_exit=2, **GREEDY)
    assert got == expected
    assert "`assistant_early_exit`: transformers' speculative decoding" in caplog.text


def test_the_padding_id_travels_inside_a_given_generation_config(llama, monkeypatch):
    """transformers warns when a `generation_config` comes with generation arguments: the padding id batching needs
    goes into a copy of the config, the caller's own left as it was."""
    model, tok, _ = llama
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    given = GenerationConfig(max_new_tokens=3)
    got = generate_batch(model, tok, PROMPTS[:2], progress=False, generation_config=given)
    assert "pad_token_id" not in calls[0]
    assert calls[0]["generation_config"].pad_token_id == tok.pad_token_id
    assert given.pad_token_id is None
    monkeypatch.undo()
    assert got == [_text(tok, _alone(model, tok, tok(p)["input_ids"])[:3]) for p in PROMPTS[:2]]


def test_a_padding_id_the_model_has_no_token_for(llama, caplog):
    """A padding token added to the tokenizer without resizing the model's embeddings (`add_special_tokens({"pad_token":
    "[PAD]"})`, a recipe for tokenizers without one), or a `-1` in a config: each prompt alone generated, but a batch
    failed in the embedding with torch's bare "IndexError: index out of range in self" (on a GPU a device-side
    assert). The tokenizer's is passed over for the model's own padding id, with a warning naming it (the padding is
    masked: each prompt gets what it gets alone; `generate --input` has no option to name another); one given
    (`pad_token_id=`, or in a `generation_config`) is refused before anything is generated, naming it and the fix."""
    model, tok, _ = llama
    padded = copy.deepcopy(tok)
    padded.add_tokens([f"<extra_{i}>" for i in range(_models.VOCAB_SIZE - len(padded))], special_tokens=True)
    padded.add_special_tokens({"pad_token": "[PAD]"})
    assert padded.pad_token_id >= _models.VOCAB_SIZE  # (the premise: no row of the embedding)
    expected = [_text(tok, _alone(model, tok, tok(p)["input_ids"])) for p in PROMPTS[:3]]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        assert generate_batch(model, padded, PROMPTS[:3], batch_size=3, progress=False, **GREEDY) == expected
    assert (
        f"The tokenizer's `pad_token_id`, {padded.pad_token_id}, is not a token of LlamaForCausalLM's vocabulary of "
        f"{_models.VOCAB_SIZE} tokens (a padding token added to the tokenizer without resizing the model's "
        f"embeddings?); padding with {model.generation_config.pad_token_id} instead"
    ) in caplog.text
    message = r"^`pad_token_id`, -1, is not a token of LlamaForCausalLM's vocabulary: batched generation pads prompts"
    with pytest.raises(ValueError, match=message + rf".*\(its end-of-sequence id, {tok.eos_token_id}, as `generate`"):
        generate_batch(model, tok, PROMPTS[:3], batch_size=3, progress=False, pad_token_id=-1, **GREEDY)
    given = GenerationConfig(pad_token_id=_models.VOCAB_SIZE, **GREEDY)
    message = rf"^The `generation_config`'s `pad_token_id`, {_models.VOCAB_SIZE}, is not a token of LlamaForCausalLM"
    with pytest.raises(ValueError, match=message):
        generate_batch(model, tok, PROMPTS[:3], batch_size=3, progress=False, generation_config=given)
    assert generate_batch(model, padded, PROMPTS[:3], batch_size=1, progress=False, **GREEDY) == expected


def test_a_generate_call_returning_more_sequences_than_prompts_is_refused(llama, monkeypatch):
    """Results are paired with prompts row by row: any extra row would shift every pairing after it."""
    model, tok, _ = llama
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: original(*a, **k).repeat_interleave(2, dim=0))
    with pytest.raises(ValueError, match="`generate` returned 4 sequences for a batch of 2 prompts"):
        generate_batch(model, tok, PROMPTS[:2], batch_size=2, progress=False, max_new_tokens=2)


def test_a_prompt_lookup_that_is_not_a_positive_int_is_refused_naming_it(llama, tmp_path):
    """`prompt_lookup_num_tokens=0` or `-1` (or a `max_matching_ngram_size` of 0) ended in transformers' "Invalid
    max_matching_ngram_size or num_output_tokens", naming no argument given: refused up front, naming the argument
    (or the generation config it is in) and what it takes, as `measure_sweeps` refuses it."""
    model, tok, _ = llama
    for value in (0, -1):
        with pytest.raises(
            ValueError, match=rf"^`prompt_lookup_num_tokens` must be a positive int \(e.g. 10\) or None, got {value}\."
        ):
            generate_batch(model, tok, PROMPTS[:2], progress=False, prompt_lookup_num_tokens=value, **GREEDY)
    with pytest.raises(
        ValueError, match=r"`prompt_lookup_num_tokens` .* got 0 \(from the `generation_config` given\)\."
    ):
        generate_batch(
            model,
            tok,
            PROMPTS[:2],
            progress=False,
            generation_config=GenerationConfig(max_new_tokens=3, prompt_lookup_num_tokens=0),
        )
    with pytest.raises(TypeError, match=r"`prompt_lookup_num_tokens` must be a positive int .* got float 2\.5\."):
        generate_batch(model, tok, PROMPTS[:2], progress=False, prompt_lookup_num_tokens=2.5, **GREEDY)
    with pytest.raises(
        ValueError, match=r"^`max_matching_ngram_size` must be a positive int \(e.g. 2\) or None, got 0"
    ):
        generate_batch(
            model, tok, PROMPTS[:2], progress=False, prompt_lookup_num_tokens=3, max_matching_ngram_size=0, **GREEDY
        )
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": PROMPTS[0]}) + "\n")
    with pytest.raises(ValueError, match=r"^`prompt_lookup_num_tokens` must be a positive int"):
        generate_jsonl(model, tok, inp, tmp_path / "out.jsonl", progress=False, prompt_lookup_num_tokens=0, **GREEDY)
    assert not (tmp_path / "out.jsonl").exists()
    # (a positive one still runs, one prompt per call)
    assert generate_batch(model, tok, PROMPTS[:2], progress=False, prompt_lookup_num_tokens=2, **GREEDY) == (
        generate_batch(model, tok, PROMPTS[:2], progress=False, **GREEDY)
    )


def test_transformers_continuous_batching_is_refused_and_other_outputs_are_named(llama, tmp_path, monkeypatch):
    """`cache_implementation="paged"` makes `generate` run transformers' continuous batching, which returns a 3-D
    tensor and takes no streamer: it failed naming the job's own progress streamer, or (beam search) gave empty
    completions written to the file as finished, which a rerun without it kept. Refused before anything runs; a
    `generate` returning anything but one sequence per row is refused as such."""
    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 0, "prompt": PROMPTS[0]}) + "\n")
    for run in (
        lambda: generate_batch(model, tok, PROMPTS[:2], progress=False, cache_implementation="paged", num_beams=2),
        lambda: generate_jsonl(
            model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, cache_implementation="paged"
        ),
    ):
        with pytest.raises(ValueError, match=r"`cache_implementation='paged'` makes `generate` run transformers' "):
            run()
    assert not (tmp_path / "out.jsonl").exists()
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: original(*a, **k)[None])
    with pytest.raises(ValueError, match=r"`generate` returned Tensor \(1, 2, \d+\), not a tensor of one sequence"):
        generate_batch(model, tok, PROMPTS[:2], batch_size=2, progress=False, max_new_tokens=2)


def test_a_job_counts_its_own_sweeps_while_another_thread_runs_the_model(llama, tmp_path):
    """Two jobs on one model from two threads: each counted the other's sweeps too (its tokens per sweep halved).
    Here a logits processor runs a pass of the model in another thread at every step of the job."""
    model, tok, _ = llama

    class PassInAnotherThread(LogitsProcessor):
        def __call__(self, input_ids, scores):
            def run():
                with torch.no_grad():
                    model(torch.tensor([[1, 2, 3]]))

            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
            self.calls = getattr(self, "calls", 0) + 1
            return scores

    _write_input(tmp_path / "in.jsonl")
    alone = generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "a.jsonl", progress=False, **GREEDY)
    other = PassInAnotherThread()
    kw = {"progress": False, "logits_processor": [other], **GREEDY}
    busy = generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "b.jsonl", **kw)
    assert other.calls >= GREEDY["max_new_tokens"] and busy["sweeps"] == alone["sweeps"] > 0
    with pytest.raises(TypeError, match=r"a thread's `threading.get_ident\(\)` \(an int\), got _MainThread: pass its"):
        SweepCounter(model, thread=threading.current_thread())
    completions = [[json.loads(line)["completion"] for line in (tmp_path / f).open()] for f in ("a.jsonl", "b.jsonl")]
    assert completions[0] == completions[1]


class _StopAtToken(StoppingCriteria):
    """A custom stopping criterion: ends a row once it generates `token` (`generate` pads the row after it)."""

    def __init__(self, token: int):
        self.token = token
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("how", ["stop_strings", "stopping_criteria"])
def test_rows_ended_by_stop_strings_or_criteria_report_stop(llama, tmp_path, how):
    """A row ended by a stop string or a custom criterion is padded by `generate` while the batch runs on: its result
    is what generating it alone gives, `finish_reason` "stop", the padding not counted. The tokenizer reaches
    `generate` (stop strings need it)."""
    model, tok, _ = llama
    prompts = PROMPTS[:6]
    plain = _alone(model, tok, tok(prompts[1])["input_ids"])
    if how == "stop_strings":
        stop = tok.decode(plain[1:2]).strip()
        assert stop
        kw = {"stop_strings": [stop]}
        alone_kw = {"stop_strings": [stop], "tokenizer": tok}
    else:
        criterion = _StopAtToken(plain[1])
        kw = {"stopping_criteria": StoppingCriteriaList([criterion])}
        alone_kw = {"stopping_criteria": StoppingCriteriaList([_StopAtToken(plain[1])])}
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    stats = generate_jsonl(
        model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=6, progress=False, **GREEDY, **kw
    )
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for p, r in zip(prompts, records):
        new = _alone(model, tok, tok(p)["input_ids"], **alone_kw)
        ended = len(new) < GREEDY["max_new_tokens"] or new[-1] in (tok.eos_token_id, plain[1])
        assert (r["completion"], r["completion_tokens"]) == (_text(tok, new), len(new))
        assert r["finish_reason"] == ("stop" if ended else "length")
    # the batch had rows stopped early next to rows that ran to the end: padding was there to be miscounted
    assert {r["finish_reason"] for r in records} == {"stop", "length"}
    assert any(r["completion_tokens"] < GREEDY["max_new_tokens"] and r["finish_reason"] == "stop" for r in records)
    assert stats["tokens"] == sum(r["completion_tokens"] for r in records)
    if how == "stopping_criteria":
        assert criterion.calls == GREEDY["max_new_tokens"]  # called once per step, as `generate` alone calls it
    # generate_batch gives the same completions
    assert generate_batch(model, tok, prompts, progress=False, **GREEDY, **kw) == [r["completion"] for r in records]


def test_beam_search_rows_ended_by_a_stop_string_report_stop_whatever_the_batch_size(llama, tmp_path):
    """Beam search with `stop_strings`: a row its stop string ended was reported "length" at batch size 1, and at
    batch size 3 "stop" with one token too many (the end-of-sequence id transformers fills finished beams with was
    counted as generated). Each row now reports "stop" and the tokens generating it alone gives, at any batch size."""
    model, tok, _ = llama
    prompts = ["a", "The quick brown fox jumps over the lazy dog", "x y z"]
    kw = {"max_new_tokens": 12, "do_sample": False, "num_beams": 2, "stop_strings": [" "]}
    alone = []
    for p in prompts:
        x = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**x, pad_token_id=tok.pad_token_id, tokenizer=tok, **kw)
        alone.append(out[0, x["input_ids"].shape[1] :].tolist())
    assert any(len(new) < kw["max_new_tokens"] for new in alone) and any(len(n) == kw["max_new_tokens"] for n in alone)
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}.jsonl"
        generate_jsonl(model, tok, tmp_path / "in.jsonl", out, batch_size=batch_size, progress=False, **kw)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        for new, r in zip(alone, records):
            stopped = " " in tok.decode(new) and len(new) < kw["max_new_tokens"]
            assert (r["completion_tokens"], r["finish_reason"]) == (len(new), "stop" if stopped else "length"), r


def test_beam_search_rows_ended_by_a_stopping_criterion_count_the_tokens_generated(llama, tmp_path):
    """Beam search with a custom stopping criterion, in a batch: transformers fills the rest of a row it ended with
    the end-of-sequence id where the padding id is 0 (it takes that id for none), and that fill was counted as a
    token generated (`completion_tokens`, `measure_sweeps`' `tokens` and `output_ids`: one too many). Each row now
    counts the tokens generating it alone gives, at any batch size."""
    from hf_layerstream.speculative import measure_sweeps

    model, tok, _ = llama
    assert tok.pad_token_id == 0 and tok.eos_token_id != 0
    prompts = list(_models.SAMPLE_PROMPTS)
    kw = {"max_new_tokens": 12, "do_sample": False, "num_beams": 2, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        x = tok(prompts[1], return_tensors="pt")
        token = model.generate(**x, **kw)[0, x["input_ids"].shape[1] + 2].item()

    def stop():
        return {"stopping_criteria": StoppingCriteriaList([_StopAtToken(token)])}

    alone = []
    for p in prompts:
        x = tok(p, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**x, **kw, **stop())[0, x["input_ids"].shape[1] :].tolist()
        alone.append(new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new)
    assert any(len(new) < kw["max_new_tokens"] and new[-1] == token for new in alone)
    assert any(len(new) == kw["max_new_tokens"] for new in alone)
    batch = tok(prompts, return_tensors="pt", padding=True)
    r = measure_sweeps(model, batch.input_ids, attention_mask=batch.attention_mask, **kw, **stop())
    assert r["output_ids"] == alone and r["tokens"] == sum(map(len, alone))
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}.jsonl"
        generate_jsonl(model, tok, tmp_path / "in.jsonl", out, batch_size=batch_size, progress=False, **kw, **stop())
        records = [json.loads(line) for line in out.read_text().splitlines()]
        for new, rec in zip(alone, records):
            ended = len(new) < kw["max_new_tokens"] or new[-1] in (tok.eos_token_id, token)
            assert (rec["completion_tokens"], rec["finish_reason"]) == (len(new), "stop" if ended else "length"), rec


def test_a_draft_with_another_vocabulary_size(llama, checkpoints, tmp_path):
    """Universal assisted decoding: a draft whose vocabulary size differs needs `tokenizer=` and
    `assistant_tokenizer=` in `generate`; the batch functions pass their tokenizer on. Greedy output unchanged."""
    model, tok, _ = llama
    draft_ckpt = _models.save_tiny_checkpoint(
        _models.make_config("llama", num_hidden_layers=1, vocab_size=136), tmp_path / "draft"
    )
    draft = _models.load_reference(draft_ckpt)
    prompts = PROMPTS[:2]
    expected = [_text(tok, _alone(model, tok, tok(p)["input_ids"])) for p in prompts]
    got = generate_batch(
        model,
        tok,
        prompts,
        progress=False,
        assistant_model=draft,
        assistant_tokenizer=AutoTokenizer.from_pretrained(draft_ckpt),
        **GREEDY,
    )
    assert got == expected


def test_resume_refuses_an_output_file_that_is_not_results(llama, tmp_path):
    """Only an unfinished result line at the end is a torn write to drop; any other line that is not a result (a
    file of one's own, a copy of the input) is refused and left as it is."""
    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "Hello"}) + "\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, one line, no newline at the end")
    with pytest.raises(ValueError, match=r"notes.txt:1 is not a result line"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", notes, progress=False, max_new_tokens=2)
    assert notes.read_text() == "my notes, one line, no newline at the end"
    copy = tmp_path / "copy.jsonl"
    copy.write_text((tmp_path / "in.jsonl").read_text())
    with pytest.raises(ValueError, match=r"copy.jsonl:1 is not a result line"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", copy, progress=False, max_new_tokens=2)
    assert copy.read_text() == (tmp_path / "in.jsonl").read_text()
    for torn in ('{"i', '{"id": "a", "completion": "x'):  # crashes in the middle of writing a result
        (tmp_path / "out.jsonl").write_text(torn)
        stats = generate_jsonl(
            model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2
        )
        assert stats["repaired"] is True and stats["generated"] == 1
        assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == "a"


def test_an_unpaired_surrogate_is_refused_when_the_input_is_read(llama, tmp_path):
    """`"\\ud800"` is valid JSON but no text: refused before any generation, not when writing the result."""
    model, tok, _ = llama
    for line in ('{"id": "\\ud800", "prompt": "hello"}', '{"id": 1, "prompt": "a \\udc00 b"}'):
        (tmp_path / "in.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=r"in.jsonl:1 holds an unpaired surrogate"):
            generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
        assert not (tmp_path / "out.jsonl").exists()


def test_a_utf16_input_file_is_named_so(llama, tmp_path):
    """A JSONL file saved as UTF-16 (Windows PowerShell's `>` and `Out-File` write it, with a byte-order mark) was
    called "not UTF-8 text (invalid start byte at byte 0)", with `iconv -f LATIN1` as the fix, which gives a file of
    NUL bytes. It is named as UTF-16 now, with the conversion that works."""
    model, tok, _ = llama
    text = json.dumps({"id": 1, "prompt": "Hello"}) + "\n"
    for codec in ("utf-16-le", "utf-16-be"):
        (tmp_path / "in.jsonl").write_bytes(("\ufeff" + text).encode(codec))
        with pytest.raises(ValueError, match=r"in.jsonl:1: the file is UTF-16 text .*`iconv -f UTF-16 -t UTF-8`"):
            generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_completion_holding_a_unicode_line_separator_stays_on_one_line(llama, tmp_path, monkeypatch):
    """JSON leaves U+2028, U+2029 and U+0085 (NEL) as they are in a string, and the results were written with
    `ensure_ascii=False`: a completion holding one (a model can generate them) made its result two lines for
    `str.splitlines()` (`Path.read_text().splitlines()`), which then failed to parse. They are escaped now: one line
    per prompt however the file is split, the completion itself unchanged."""
    from hf_layerstream import batch

    model, tok, _ = llama
    odd = "one\u2028two\u2029three\x85four é"
    monkeypatch.setattr(batch, "completion_text", lambda *a: odd)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False, max_new_tokens=2)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and [json.loads(line)["completion"] for line in lines] == [odd] * 3
    assert "é" in lines[0]  # (other text is written as it is, not escaped)


def test_resume_refuses_another_logits_processor_or_chat_template(llama, tmp_path):
    """The fingerprint took an object passed to `generate` (a logits processor, a stopping criterion) by its class's
    name, and `chat` as a flag: a resumed job suppressing other tokens, or rendering prompts with another chat template
    (`--tokenizer` of another model), mixed its results with the first run's, silently. Those are settings now; the
    same ones resume, and results a 0.1.0 job wrote (its fingerprint of the same settings) still resume."""
    from transformers import SuppressTokensLogitsProcessor

    from hf_layerstream import batch

    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))

    def suppress(tokens):
        return [SuppressTokensLogitsProcessor(tokens)]

    def first_line(**kw):
        generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", progress=False, max_new_tokens=3, **kw)
        line = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
        (tmp_path / "straight.jsonl").unlink()
        out.write_text(line)  # as if killed after the first prompt
        return line

    first_line(logits_processor=suppress([85]))
    with pytest.raises(ValueError, match="made with other settings than this run's"):
        generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3, logits_processor=suppress(range(4, 99)))
    stats = generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3, logits_processor=suppress([85]))
    assert stats["skipped"] == 1

    templated = tok.chat_template
    first_line(chat=True)
    tok.chat_template = templated.replace("assistant:", "answer:")
    try:
        with pytest.raises(ValueError, match="made with other settings than this run's"):
            generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3, chat=True)
    finally:
        tok.chat_template = templated

    line = json.loads(first_line(chat=True))
    line["settings_sha256"] = batch._settings_digest(
        tok, True, batch._check_kwargs(model, 8, {"max_new_tokens": 3})[1], {"max_new_tokens": 3}, legacy=True
    )
    out.write_text(json.dumps(line) + "\n")
    stats = generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3, chat=True)
    assert stats["skipped"] == 1 and stats["generated"] == 1


def test_sampling_settings_of_a_greedy_job_are_not_part_of_its_settings(llama, tmp_path):
    """Greedy results do not depend on `temperature`, `top_p` and the other sampling-only settings (transformers
    uses them only with `do_sample=True`), as they do not on `seed`; but they were part of a greedy job's settings:
    `hf-layerstream generate --input ... --temperature 0.5` (greedy: the command says it is ignored) resumed without
    it was refused, "made with other settings than this run's ... the results would mix", though they would not.
    A greedy job resumes whatever its sampling settings, and so do results written with them in their fingerprint;
    a sampled job's are its settings still."""
    from hf_layerstream import batch

    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    greedy = {"max_new_tokens": 3, "do_sample": False}
    generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", progress=False, **greedy)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    out.write_text(first)  # as if killed after the first prompt
    stats = generate_jsonl(model, tok, inp, out, progress=False, temperature=0.5, top_p=0.9, top_k=3, **greedy)
    assert stats["skipped"] == 1 and stats["generated"] == 1
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    # a result whose fingerprint holds them (as written before): taken
    kwargs = {"temperature": 0.5, "top_p": 0.9, **greedy}
    config = batch._check_kwargs(model, 8, dict(kwargs))[1]
    record = json.loads(first)
    record["settings_sha256"] = batch._settings_digest(tok, False, config, dict(kwargs), greedy_sampling=True)
    assert record["settings_sha256"] != json.loads(first)["settings_sha256"]  # (the premise)
    out.write_text(json.dumps(record) + "\n")
    stats = generate_jsonl(model, tok, inp, out, progress=False, **kwargs)
    assert stats["skipped"] == 1 and stats["generated"] == 1
    # sampled: another temperature is another job
    sampled = {"max_new_tokens": 3, "do_sample": True}
    generate_jsonl(model, tok, inp, tmp_path / "sampled.jsonl", progress=False, seed=1, temperature=0.5, **sampled)
    out.write_text((tmp_path / "sampled.jsonl").read_text().splitlines(True)[0])
    with pytest.raises(ValueError, match="made with other settings than this run's"):
        generate_jsonl(model, tok, inp, out, progress=False, seed=1, temperature=0.7, **sampled)


def test_resume_refuses_another_chat_template_for_conversation_lines(llama, tmp_path, caplog):
    """`{"messages": [...]}` lines are rendered with the chat template whether or not `chat` is set, but the template
    was part of the settings only with `chat=True`: a job of conversations resumed with another template (`--tokenizer`
    of another model) took the first run's results and rendered the rest otherwise, silently mixing them. The
    template is a setting wherever a prompt is a conversation; the same one resumes, and results written before
    (no template in their fingerprint) resume with a warning."""
    from hf_layerstream import batch

    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": i, "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS[:2])]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", progress=False, max_new_tokens=3)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    out.write_text(first)  # as if killed after the first prompt
    templated = tok.chat_template
    tok.chat_template = templated.replace("assistant:", "answer:")
    try:
        with pytest.raises(ValueError, match="made with other settings than this run's"):
            generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3)
    finally:
        tok.chat_template = templated
    assert out.read_text() == first
    stats = generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3)
    assert stats["skipped"] == 1 and stats["generated"] == 1
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    # with "prompt" lines too, `chat` still decides how those are rendered: a resume with another is refused
    inp.write_text(inp.read_text() + json.dumps({"id": 2, "prompt": PROMPTS[2]}) + "\n")
    with pytest.raises(ValueError, match="made with other settings than this run's"):
        generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3, chat=True)
    assert generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3)["generated"] == 1
    # a result written before the template was part of the settings: taken, with a warning (a sampled, seeded job)
    sampled = {"max_new_tokens": 3, "do_sample": True, "top_k": 0}
    config = batch._check_kwargs(model, 8, dict(sampled))[1]
    record = json.loads(first)
    record["settings_sha256"] = batch._settings_digest(tok, False, config, dict(sampled), seed=5)
    out.write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        stats = generate_jsonl(model, tok, inp, out, progress=False, seed=5, **sampled)
    assert stats["skipped"] == 1 and "record no chat template" in caplog.text


def test_resume_refuses_another_tokenizer(llama, checkpoints, tmp_path, caplog):
    """The tokenizer was not part of a job's fingerprint: a job resumed with another one (`--tokenizer` another
    folder, a tokenizer with added tokens or another vocabulary) took the first run's results and tokenized the rest
    otherwise, silently mixing them. Its identity (its vocabulary, added tokens, normalization and the rest, as it
    serializes itself) is a setting now: the same tokenizer, loaded again, resumes; results written before (no
    tokenizer in their fingerprint) resume with a warning."""
    from hf_layerstream import batch

    model, tok, _ = llama
    ckpt, _ = checkpoints("llama")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", progress=False, max_new_tokens=3)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    out.write_text(first)  # as if killed after the first prompt
    added = AutoTokenizer.from_pretrained(ckpt)
    added.add_tokens(["capital"])  # (the same text tokenized otherwise)
    with pytest.raises(ValueError, match="made with other settings than this run's: .*the tokenizer"):
        generate_jsonl(model, added, inp, out, progress=False, max_new_tokens=3)
    assert out.read_text() == first
    # the same files, decoding otherwise: the completions' spaces before punctuation kept or cleaned up
    cleans = AutoTokenizer.from_pretrained(ckpt)
    cleans.clean_up_tokenization_spaces = not tok.clean_up_tokenization_spaces
    with pytest.raises(ValueError, match="made with other settings than this run's: .*the tokenizer"):
        generate_jsonl(model, cleans, inp, out, progress=False, max_new_tokens=3)
    assert out.read_text() == first
    # the same tokenizer, loaded again (another object, its state touched by other calls): the same job
    again = AutoTokenizer.from_pretrained(ckpt)
    again(["a", "bb"], padding=True, truncation=True, max_length=1)
    stats = generate_jsonl(model, again, inp, out, progress=False, max_new_tokens=3)
    assert stats["skipped"] == 1 and stats["generated"] == 1
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    # a result written before the tokenizer was part of the settings: taken, with a warning
    record = json.loads(first)
    config = batch._check_kwargs(model, 8, {"max_new_tokens": 3})[1]
    record["settings_sha256"] = batch._settings_digest(tok, False, config, {"max_new_tokens": 3})
    assert record["settings_sha256"] != json.loads(first)["settings_sha256"]  # (the premise)
    out.write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        stats = generate_jsonl(model, tok, inp, out, progress=False, max_new_tokens=3)
    assert stats["skipped"] == 1 and stats["generated"] == 1 and "record no tokenizer" in caplog.text


def _gpt2_and_a_prompt_of_200_tokens(checkpoints):
    """GPT-2 streamed (its learned table of 256 positions here), its tokenizer, a prompt of about 200 tokens and how
    many it has."""
    ckpt, shards = checkpoints("gpt2")
    model = streamed_model(ckpt, shards)
    tok = AutoTokenizer.from_pretrained(ckpt)
    long = "hello"
    while len(tok(long + " hello").input_ids) < 200:
        long += " hello"
    return model, tok, long, len(tok(long).input_ids)


def test_a_prompt_past_a_learned_position_table_is_refused_before_any_generation(checkpoints, tmp_path):
    """GPT-2's learned table of 256 positions here: a job whose longest prompt and `max_new_tokens` ran past it ended
    in a torch `IndexError` traceback part way through the first batch (`hf-layerstream generate --input` too), with
    no result for the other prompts of that batch. Refused before anything is generated, naming the prompt; within
    the table it runs (the last new token needs no position: a prompt of P tokens takes 257 - P)."""
    model, tok, long, n = _gpt2_and_a_prompt_of_200_tokens(checkpoints)
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"id": "short", "prompt": "hi"}) + "\n" + json.dumps({"id": "long", "prompt": long}) + "\n"
    )
    message = rf"Prompt 'long' \({n} tokens\) and `max_new_tokens` {258 - n} run past the 256 positions of "
    with pytest.raises(ValueError, match=message + rf".*pass `max_new_tokens` {257 - n} or less"):
        generate_jsonl(
            model, tok, inp, tmp_path / "out.jsonl", progress=False, max_new_tokens=258 - n, min_new_tokens=258 - n
        )
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match="Prompt 1 "):
        generate_batch(model, tok, ["hi", long], progress=False, max_new_tokens=258 - n, min_new_tokens=258 - n)
    kw = {"max_new_tokens": 257 - n, "min_new_tokens": 257 - n}
    assert len(generate_batch(model, tok, ["hi", long], progress=False, **kw)) == 2


def test_a_max_length_past_a_learned_position_table_is_refused_as_max_new_tokens_is(checkpoints, tmp_path):
    """An explicit `max_length` (which counts the prompt and its padding) was not checked against GPT-2's learned
    position table as `max_new_tokens` is: one past it ended in a bare torch `IndexError` part way through the first
    batch. Refused before anything is generated, naming the prompt and the fix; within the table it runs (the last
    token needs no position: `max_length` up to 257 with 256 positions)."""
    model, tok, long, n = _gpt2_and_a_prompt_of_200_tokens(checkpoints)
    message = rf"^Prompt 1 \({n} tokens\) and `max_length` 258 run past the 256 positions of GPT2LMHeadModel's "
    with pytest.raises(ValueError, match=message + r".*pass `max_length` 257 or less \(or `max_new_tokens` "):
        generate_batch(model, tok, ["hi", long], progress=False, max_length=258, min_length=258)
    with pytest.raises(ValueError, match=r"`max_length` 258 \(from the `generation_config` given\) run past"):
        generate_batch(model, tok, ["hi", long], progress=False, generation_config=GenerationConfig(max_length=258))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "long", "prompt": long}) + "\n")
    with pytest.raises(ValueError, match=rf"^Prompt 'long' \({n} tokens\) and `max_length` 258 run past"):
        generate_jsonl(model, tok, inp, tmp_path / "out.jsonl", progress=False, max_length=258)
    assert not (tmp_path / "out.jsonl").exists()
    # (max_new_tokens decides where both are given, as in `generate`)
    assert len(generate_batch(model, tok, ["hi", long], progress=False, max_length=258, max_new_tokens=2)) == 2
    assert len(generate_batch(model, tok, ["hi", long], progress=False, max_length=257, min_length=257)) == 2


def test_a_length_past_a_learned_position_table_says_where_the_length_came_from(checkpoints, tmp_path):
    """A refusal of a `max_length` past GPT-2's learned position table said "(from the generation config)" of every
    length the call did not give, the value transformers' default where nothing set one. It names where it came from:
    the call, the `generation_config` given, the shard directory's generation_config.json, the model's
    `generation_config`. With no length set (transformers' default: 20 new tokens, up to the table's end), a prompt
    filling the table ended in transformers' "Input length of input_ids is N, but `max_length` is set to 256 ... consider
    increasing `max_length`", a value nobody set whose increase runs past the table: refused naming the prompt."""
    model, tok, long, n = _gpt2_and_a_prompt_of_200_tokens(checkpoints)
    past = rf"^Prompt 1 \({n} tokens\) and `max_length` 258"
    with pytest.raises(ValueError, match=past + r" run past"):
        generate_batch(model, tok, ["hi", long], progress=False, max_length=258)
    with pytest.raises(ValueError, match=past + r" \(from the `generation_config` given\) run past"):
        generate_batch(model, tok, ["hi", long], progress=False, generation_config=GenerationConfig(max_length=258))
    own = model.generation_config
    model.generation_config = GenerationConfig(max_length=258)
    try:
        with pytest.raises(ValueError, match=past + r" \(from `model.generation_config`\) run past"):
            generate_batch(model, tok, ["hi", long], progress=False)
    finally:
        model.generation_config = own
    ckpt, shards = checkpoints("gpt2")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "max_length": 258}))
    from_file = streamed_model(ckpt, copy)
    with pytest.raises(ValueError, match=past + r" \(from the shard directory's generation_config.json\) run past"):
        generate_batch(from_file, tok, ["hi", long], progress=False)
    # no length set: the prompt alone, named as such
    longer = long + " " + long
    m = len(tok(longer).input_ids)
    message = rf"^Prompt 1 \({m} tokens\) runs past the 256 positions of GPT2LMHeadModel's learned position table "
    with pytest.raises(ValueError, match=message + r".*no length is set \(transformers' default: 20 new tokens"):
        generate_batch(model, tok, ["hi", longer], progress=False)
    assert len(generate_batch(model, tok, ["hi", long], progress=False)) == 2  # (20 new tokens fit after it)


def test_resume_refuses_other_settings(llama, tmp_path, caplog):
    """A resumed job whose rendering or generation settings changed would mix results: refused. The batch size and
    speed-only settings (prompt lookup, a draft) may change."""
    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", batch_size=1, progress=False, max_new_tokens=3)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    out.write_text(first)  # as if killed after the first prompt
    for kw in (
        {"max_new_tokens": 5},
        {"max_new_tokens": 3, "chat": True},
        {"max_new_tokens": 3, "do_sample": True},
        {"generation_config": GenerationConfig(max_new_tokens=3, repetition_penalty=1.3)},
    ):
        with pytest.raises(ValueError, match="made with other settings than this run's"):
            generate_jsonl(model, tok, inp, out, batch_size=1, progress=False, **kw)
        assert out.read_text() == first
    stats = generate_jsonl(
        model, tok, inp, out, batch_size=2, progress=False, max_new_tokens=3, prompt_lookup_num_tokens=2
    )
    assert stats["skipped"] == 1 and stats["generated"] == 2
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    # results written before the fingerprint existed are taken, with a warning
    record = json.loads(first)
    del record["settings_sha256"]
    out.write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        stats = generate_jsonl(model, tok, inp, out, batch_size=2, progress=False, max_new_tokens=3)
    assert stats["skipped"] == 1 and "have no `settings_sha256`" in caplog.text


def test_resume_refuses_other_settings_given_as_numpy_numbers(llama, tmp_path):
    """A generation setting given as a NumPy number (`max_new_tokens=np.int64(3)`, read from an array) went into the
    settings' fingerprint by its type's name, "int64": a resume with another value was taken, the results mixing (3
    tokens for the first prompt, 5 for the others). By its value: another one is refused, and the same one given as
    Python's number resumes."""
    np = pytest.importorskip("numpy")
    model, tok, _ = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    straight = tmp_path / "straight.jsonl"
    generate_jsonl(model, tok, inp, straight, batch_size=2, progress=False, max_new_tokens=np.int64(3))
    first = straight.read_text().splitlines(True)[0]
    out.write_text(first)  # as if killed after the first prompt
    with pytest.raises(ValueError, match="made with other settings than this run's"):
        generate_jsonl(model, tok, inp, out, batch_size=2, progress=False, max_new_tokens=np.int64(5))
    assert out.read_text() == first
    stats = generate_jsonl(model, tok, inp, out, batch_size=2, progress=False, max_new_tokens=3)
    assert stats["skipped"] == 1 and out.read_text() == straight.read_text()


def test_resume_refuses_another_seed_of_a_sampled_job(llama, tmp_path, caplog, capsys):
    """A sampled job's seed (`seed=`, `generate --seed`) was not one of its settings: a resume with another seed mixed
    its samples with the first run's, silently. It is now, for sampled jobs only (greedy results do not depend on it);
    results written before (no seed in their fingerprint) resume with a warning."""
    from hf_layerstream import batch

    model, tok, shards = llama
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3])))
    sampled = {"max_new_tokens": 3, "do_sample": True, "top_k": 0}

    def first_line(**kw):
        generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", batch_size=1, progress=False, **kw)
        line = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
        (tmp_path / "straight.jsonl").unlink()
        out.write_text(line)  # as if killed after the first prompt
        return line

    first = first_line(seed=1, **sampled)
    for other in ({"seed": 2}, {}):
        with pytest.raises(ValueError, match="made with other settings than this run's.*`seed`"):
            generate_jsonl(model, tok, inp, out, batch_size=1, progress=False, **other, **sampled)
        assert out.read_text() == first
    stats = generate_jsonl(model, tok, inp, out, batch_size=1, progress=False, seed=1, **sampled)
    assert stats["skipped"] == 1 and stats["generated"] == 2
    # the seed seeds the job: the same seed, the same samples
    generate_jsonl(model, tok, inp, tmp_path / "again.jsonl", batch_size=1, progress=False, seed=1, **sampled)
    again = (tmp_path / "again.jsonl").read_text()
    assert again.splitlines(True)[0] == first

    # through the CLI: `--seed` reaches the job's settings
    args = ["generate", str(shards), "--input", str(inp), "--max-new-tokens", "3", "--do-sample", "--device", "cpu"]
    out.write_text(first)
    assert cli_main([*args, "--seed", "2", "--output", str(out)]) == 2
    assert "made with other settings than this run's" in capsys.readouterr().err
    assert out.read_text() == first

    # greedy: the seed is not a setting
    first_line(seed=1, max_new_tokens=3)
    stats = generate_jsonl(model, tok, inp, out, batch_size=1, progress=False, seed=2, max_new_tokens=3)
    assert stats["skipped"] == 1

    # a result written before the seed was part of the settings: taken, with a warning
    record = json.loads(first)
    config = batch._check_kwargs(model, 1, dict(sampled))[1]
    record["settings_sha256"] = batch._settings_digest(tok, False, config, dict(sampled))
    out.write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        stats = generate_jsonl(model, tok, inp, out, batch_size=1, progress=False, seed=1, **sampled)
    assert stats["skipped"] == 1 and "record no seed" in caplog.text


def test_resume_refuses_another_model(llama, checkpoints, tmp_path, caplog):
    """The settings fingerprint leaves the model out: a job resumed with another model (the checkpoint split again at
    another dtype, the same shards streamed at another dtype, a PEFT adapter attached, a model loaded whole) took the
    first run's results and mixed them with its own, silently. Each result records its model now, and another is
    refused; the same shard files at another path are the same model, and results written before the model was
    recorded resume with a warning."""
    import shutil

    from hf_layerstream import attaching_adapters, split_checkpoint

    model, tok, shards = llama
    ckpt = checkpoints("llama")[0]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    generate_jsonl(model, tok, inp, tmp_path / "straight.jsonl", progress=False, **GREEDY)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    resplit = split_checkpoint(ckpt, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    others = {
        "split again at bfloat16": streamed_model(ckpt, resplit, **STREAM_ALL),
        "streamed at bfloat16": streamed_model(ckpt, shards, dtype=torch.bfloat16, **STREAM_ALL),
        "loaded whole": _models.load_reference(ckpt),
    }
    for name, other in others.items():
        out.write_text(first)  # as if killed after the first prompt
        with pytest.raises(ValueError, match="made by another model than this run's"):
            generate_jsonl(other, tok, inp, out, progress=False, **GREEDY)
        assert out.read_text() == first, name
    # the same files at another path: the same model
    shutil.copytree(shards, tmp_path / "copy")
    stats = generate_jsonl(
        streamed_model(ckpt, tmp_path / "copy", **STREAM_ALL), tok, inp, out, progress=False, **GREEDY
    )
    assert stats["skipped"] == 1 and out.read_text() == (tmp_path / "straight.jsonl").read_text()
    # a result written before the model was recorded: taken, with a warning
    record = json.loads(first)
    del record["model_sha256"]
    out.write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.batch"):
        stats = generate_jsonl(model, tok, inp, out, progress=False, **GREEDY)
    assert stats["skipped"] == 1 and "record no model" in caplog.text
    # a PEFT adapter attached to the same streamed model
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "adapter")
    adapted = streamed_model(ckpt, shards, **STREAM_ALL)
    with attaching_adapters(adapted):
        adapted.load_adapter(str(tmp_path / "adapter"))
    out.write_text(first)
    with pytest.raises(ValueError, match="made by another model than this run's"):
        generate_jsonl(adapted, tok, inp, out, progress=False, **GREEDY)
    assert out.read_text() == first


def test_the_same_adapter_attached_either_way_is_the_same_model(llama, checkpoints, tmp_path):
    """A PEFT adapter loaded into the streamed model (`load_adapter`) and the same adapter wrapping it (`PeftModel`)
    made two `model_sha256`s (the adapter layers named with the `PeftModel`'s `base_model.model.` prefix), so a job
    begun one way was refused as made by another model when resumed the other way. They are one model now; results a
    `PeftModel` job wrote before (the old fingerprint) still resume with it."""
    peft = pytest.importorskip("peft")
    from hf_layerstream import attaching_adapters
    from hf_layerstream import batch as batch_mod

    _, tok, shards = llama
    ckpt = checkpoints("llama")[0]
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(_models.load_reference(ckpt), config).save_pretrained(tmp_path / "adapter")
    loaded = streamed_model(ckpt, shards, **STREAM_ALL)
    with attaching_adapters(loaded):
        loaded.load_adapter(str(tmp_path / "adapter"))
    wrapped = streamed_model(ckpt, shards, **STREAM_ALL)
    with attaching_adapters(wrapped):
        wrapped = peft.PeftModel.from_pretrained(wrapped, tmp_path / "adapter")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    generate_jsonl(loaded, tok, inp, tmp_path / "straight.jsonl", progress=False, **GREEDY)
    first = (tmp_path / "straight.jsonl").read_text().splitlines(True)[0]
    for resumed, by in ((wrapped, first), (loaded, first), (wrapped, None)):
        if by is None:  # (as a `PeftModel` job wrote it before)
            record = json.loads(first)
            record["model_sha256"] = batch_mod._model_digest(wrapped, legacy=True)
            assert record["model_sha256"] != json.loads(first)["model_sha256"]
            by = json.dumps(record) + "\n"
        out.write_text(by)  # as if killed after the first prompt
        stats = generate_jsonl(resumed, tok, inp, out, progress=False, **GREEDY)
        assert stats["skipped"] == 1
        lines = out.read_text().splitlines(True)
        assert lines[0] == by and lines[1] == (tmp_path / "straight.jsonl").read_text().splitlines(True)[1]


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_job_refuses_an_output_file_another_job_replaced_before_its_lock(llama, tmp_path, monkeypatch, how):
    """Between opening the output and locking it, another job that held the lock renamed its finished results over
    the path (`_rewrite_in_order`) or removed the empty file it had created: the file this job opened is no longer
    the output, and every result appended to it was lost."""
    import hf_layerstream.batch as batch

    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "Hello"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("")
    real = batch._lock

    def another_job_first(f, path):
        if how == "replaced":
            (tmp_path / "theirs").write_text("")
            os.replace(tmp_path / "theirs", path)
        else:
            path.unlink()
        real(f, path)

    monkeypatch.setattr(batch, "_lock", another_job_first)
    with pytest.raises(ValueError, match="was replaced or removed by another job while this one opened it"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", out, progress=False, max_new_tokens=2)


def test_keys_a_line_does_not_take_are_named_once(llama, tmp_path, caplog):
    """A line's other keys (a reference answer kept beside the prompt, a misspelt key, a setting of one prompt such
    as `max_new_tokens`) were ignored without a word: named in one warning, with the first line holding them."""
    model, tok, _ = llama
    (tmp_path / "in.jsonl").write_text(
        '{"id": 1, "prompt": "Hello"}\n{"id": 2, "prompt": "Hi", "answer": "x", "max_new_token": 3}\n'
        '{"id": 3, "prompt": "Hey", "answer": "y"}\n'
    )
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        stats = generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "o.jsonl", progress=False, **GREEDY)
    assert stats["generated"] == 3  # (still a job: the keys are the user's)
    named = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert named == [
        f"{tmp_path / 'in.jsonl'}: keys 'answer', 'max_new_token' are not read (first on line 2): a "
        "line's 'id' and 'prompt' or 'messages' are; generation settings such as `max_new_tokens` are "
        "the job's, for every prompt. Check a misspelt key."
    ]
    caplog.clear()
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "Hello"}\n')
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        generate_jsonl(model, tok, tmp_path / "in.jsonl", tmp_path / "o2.jsonl", progress=False, **GREEDY)
    assert not [r for r in caplog.records if "not read" in r.getMessage()]
