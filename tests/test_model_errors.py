"""Every way a model source can be wrong raises a ModelError that says what and what to do; and a
GGUF written from a Qwen2 checkpoint loads to the same logits."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastazr.model import Decoder, ModelConfig, ModelError, ModelNotFoundError, load, load_hf, pack, preset_config, save_hf
from fastazr.model import embedded
from model_helpers import TINY, assert_logits_close, random_sequences, transformers_logits, write_checkpoint


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2")
    return directory, write_checkpoint("qwen2", directory)


@pytest.fixture
def copy(qwen, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(qwen[0], target)
    return target


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load("model.gguf")
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load(tmp_path)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ModelError, match="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b, smollm2-135m"):
        load("qwen9-100b")


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed=2 ** 64), "seed must be an integer from 0 to 2\\*\\*63 - 1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(device="banana"), "device must name a torch device"),
    (dict(dtype="bf16"), "dtype must be torch.float32"),
    (dict(attention="SDPA"), "attention must be 'auto' or one of fastazr, flash_attn, torch_varlen, sdpa"),
])
def test_load_arguments_are_checked_where_they_are_given(kwargs, message):
    """Each failed later with torch's own words (an overflow while seeding, a device string) or,
    for an unknown attention backend, only at the first training forward."""
    with pytest.raises((ModelError, ValueError), match=message):
        load("qwen2.5-0.5b", **kwargs)
    with pytest.raises(ModelError, match="named by a str"):
        preset_config(None)


def test_unknown_architecture(copy):
    edit_config(copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelError, match=r"unknown architecture \['GPT2LMHeadModel'\].*supports qwen2"):
        load(copy)


def test_unsupported_features_are_named(copy):
    edit_config(copy, use_sliding_window=True)
    with pytest.raises(ModelError, match="set use_sliding_window to false"):
        load(copy)
    edit_config(copy, use_sliding_window=False, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelError, match="rope scaling 'yarn' is not supported"):
        load(copy)


def test_config_weights_shape_mismatch(copy):
    edit_config(copy, intermediate_size=96)
    with pytest.raises(ModelError, match=r"mlp.\w+_proj.weight in .* has shape \[\d+, \d+\], but the config implies "
                                         r"\[\d+, \d+\]: the config and the weights belong to different models"):
        load(copy)


def test_missing_tensor(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ModelError, match=r"lacks 1 tensor\(s\).*model.layers.1.mlp.down_proj.weight"):
        load(copy)


def test_truncated_safetensors(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupt or truncated; re-download it"):
        load(copy)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load(copy)


def test_corrupt_config(copy):
    (copy / "config.json").write_text('{"model_type": "qwen2", ')
    with pytest.raises(ModelError, match="not valid JSON"):
        load(copy)


def test_missing_shard(qwen, tmp_path):
    model = load_hf(qwen[0])
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    next((tmp_path / "sharded").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(ModelNotFoundError, match="lists shards that are missing"):
        load(tmp_path / "sharded")


def test_pytorch_bin_checkpoints_are_refused_with_a_hint(copy):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="convert them to safetensors"):
        load(copy)


def test_truncated_and_foreign_gguf(tmp_path):
    source = embedded.default_model_path(install=False)
    truncated = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(20_000_000))
    with pytest.raises(ModelError, match="corrupt or truncated; re-download it"):
        load(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(source.read_bytes()[:100])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load(header_only)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load(junk)


def test_config_validation_names_the_option():
    with pytest.raises(ModelError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        ModelConfig("qwen2", 10, 48, 10, 1, 6, 4)
    with pytest.raises(ModelError, match="unknown architecture 'mamba'"):
        ModelConfig("mamba", 10, 48, 10, 1, 6, 2)


def test_unavailable_attention_backend_is_refused_with_the_fix():
    model = Decoder(ModelConfig("llama", 10, 48, 10, 1, 6, 2), attention="torch_varlen")
    model.init_weights()
    p = pack([[1, 2, 3]])
    with pytest.raises(ModelError, match="needs a CUDA device.*pass attention='auto'"):
        model(p.input_ids, p.position_ids, p.cu_seqlens)


def write_gguf(hf_model, path, architecture="qwen2"):
    """A GGUF file of a transformers Qwen2 model with F32 tensors and no tokenizer, written by
    the gguf package the way llama.cpp's converter names things (qwen2: no q/k reordering)."""
    import gguf

    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for x in "qkv":
        layer[f"self_attn.{x}_proj.weight"] = f"attn_{x}.weight"
        layer[f"self_attn.{x}_proj.bias"] = f"attn_{x}.bias"
    for name, tensor in hf_model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{index}.{layer[rest]}"
        else:
            gguf_name = names[name]
        writer.add_tensor(gguf_name, tensor.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen2_gguf_loads_to_the_same_logits(qwen, tmp_path):
    write_gguf(qwen[1], tmp_path / "qwen.gguf")
    model, tokenizer = load(tmp_path / "qwen.gguf")
    assert tokenizer is None and model.config.qkv_bias and not model.config.tie_word_embeddings
    sequences = random_sequences([5, 30], TINY["qwen2"]["vocab_size"])
    p = pack(sequences)
    with torch.no_grad():
        ours = model.logits(model(p.input_ids, p.position_ids, p.cu_seqlens)).split([5, 30])
    for a, b in zip(ours, transformers_logits(qwen[1], sequences)):
        assert_logits_close(a, b)


def test_gguf_of_an_unknown_architecture(qwen, tmp_path):
    write_gguf(qwen[1], tmp_path / "other.gguf", architecture="falcon")
    with pytest.raises(ModelError, match="unknown architecture 'falcon'.*supports qwen2"):
        load(tmp_path / "other.gguf")


def test_gguf_header_reader_agrees_with_the_gguf_package():
    from gguf import GGUFReader

    from fastazr.model.gguf_file import GGUFFile

    path = embedded.default_model_path(install=False)
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert ours.metadata.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key in ours.metadata:
        assert ours.metadata[key] == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.shape == [int(n) for n in reversed(b.shape)] and a.kind == b.tensor_type
        assert np.array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1)), a.name
