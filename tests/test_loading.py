"""from_pretrained (streaming NF4) and save_quantized against real transformers + bitsandbytes checkpoints."""

import json

import pytest
import safetensors.torch
import torch
import transformers
from conftest import tiny_model, token_batch

import lorafx

SPEC = lorafx.LoraSpec(r=4, alpha=8, quantize="nf4")


def bnb_friendly_llama():
    """in_features a multiple of 64: bitsandbytes' CPU 4-bit matmul requires it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_load_of_sharded_checkpoint_equals_transform(tmp_path, arch):
    tiny_model(arch).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    expected = lorafx.transform(tiny_model(arch), SPEC).eval()
    lm = lorafx.from_pretrained(tmp_path, SPEC, progress=False).eval()
    assert next(r for r in lm.pass_results if r.name == "quantize_nf4").counts["loaded"] == len(lm.linear_sites()) - 1
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, expected(ids).logits, rtol=0, atol=0)
    # Round trip through our bnb 4-bit checkpoint: no requantization, same bytes, same logits.
    lm.save_quantized(tmp_path / "q")
    again = lorafx.from_pretrained(tmp_path / "q", lorafx.LoraSpec(r=4, alpha=8), progress=False).eval()
    assert again.spec.quantize == "nf4"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, rtol=0, atol=0)


def test_transformers_bnb_checkpoint_both_ways(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    bnb_friendly_llama().save_pretrained(tmp_path / "fp")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", device_map="cpu",
                                                               quantization_config=config)
    theirs.save_pretrained(tmp_path / "bnb")
    ours = lorafx.from_pretrained(tmp_path / "bnb", lorafx.LoraSpec(r=4), progress=False).eval()
    # Our streaming quantizer from the fp32 checkpoint writes the very bytes bitsandbytes wrote.
    ours_from_fp = lorafx.from_pretrained(tmp_path / "fp", SPEC, progress=False)
    ours_from_fp.save_quantized(tmp_path / "ours")
    theirs_sd = safetensors.torch.load_file(tmp_path / "bnb" / "model.safetensors")
    ours_sd = safetensors.torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in theirs_sd.items():
        assert torch.equal(ours_sd[key], value), key
    ids = token_batch()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        # bitsandbytes' CPU 4-bit matmul rounds differently from dequantize-then-matmul.
        assert ((ours(ids).logits - expected).norm() / expected.norm()).item() < 1e-2
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == (
        "bitsandbytes", "nf4", True)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lorafx.from_pretrained(tmp_path, SPEC)
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ok")
    weights = safetensors.torch.load_file(tmp_path / "ok" / "model.safetensors")

    def variant(name, edit):
        folder = tmp_path / name
        model.config.save_pretrained(folder)
        tensors = dict(weights)
        edit(tensors)
        safetensors.torch.save_file(tensors, folder / "model.safetensors")
        return folder

    missing = variant("missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(lorafx.CheckpointError, match="lacks model.norm.weight"):
        lorafx.from_pretrained(missing, SPEC, progress=False)
    wrong = variant("wrong", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8)}))
    with pytest.raises(lorafx.CheckpointError, match=r"up_proj.weight has shape \(8, 8\), the model expects \(48, 32\)"):
        lorafx.from_pretrained(wrong, SPEC, progress=False)
    extra = variant("extra", lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(8, 8)}))
    with pytest.raises(lorafx.CheckpointError, match="layers.9.mlp.up_proj.weight .* is not a parameter"):
        lorafx.from_pretrained(extra, SPEC, progress=False)
    corrupt = variant("corrupt", lambda t: None)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(lorafx.CheckpointError, match="safetensors"):
        lorafx.from_pretrained(corrupt, SPEC, progress=False)
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(lorafx.CheckpointError, match="only safetensors"):
        lorafx.from_pretrained(pickled, SPEC, progress=False)


def test_corrupt_quant_state_is_named(tmp_path):
    lm = lorafx.from_pretrained(_saved(tmp_path), SPEC, progress=False)
    lm.save_quantized(tmp_path / "q")
    tensors = safetensors.torch.load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.tensor(list(b'{"quant_type": "fp4"}'), dtype=torch.uint8)
    safetensors.torch.save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(lorafx.CheckpointError, match="model.layers.0.self_attn.q_proj.weight"):
        lorafx.from_pretrained(tmp_path / "q", SPEC, progress=False)


def _saved(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def test_encoder_checkpoint_loads_as_its_own_class(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, num_labels=3)
    bert = transformers.BertForSequenceClassification(config).eval()
    bert.save_pretrained(tmp_path)
    spec = lorafx.LoraSpec(r=2, quantize="nf4")
    ids = token_batch()
    lm = lorafx.from_pretrained(tmp_path, spec, progress=False).eval()
    assert lm.model_class == "BertForSequenceClassification"
    expected = lorafx.transform(bert, spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, expected(ids).logits, rtol=0, atol=0)
    assert lm(ids).logits.shape == (2, 3)
