"""LoraModel.generate and merge_and_unload: transformers' / PEFT's generate as the oracle."""

import peft
import pytest
import torch
import transformers
from conftest import tiny_model, token_batch
from test_multi_adapter import ADAPTERS, peft_oracle, save_peft_adapters, serving_model

import lorafx
from lorafx.generation.decode import CACHE, GenerationError


def left_padded(batch=3, seq=6):
    ids = token_batch(batch, seq)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[-1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def peft_pair(tmp_path, arch, seed=7, **config):
    """A PEFT model with a random (non-trivial) adapter and a LoraModel that loaded its folder."""
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | config
    theirs = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path)
    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec.from_peft_config(tmp_path))
    lm.load_adapter(tmp_path)
    return lm.eval(), theirs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma"])
def test_greedy_and_sampled_tokens_equal_peft_generate(tmp_path, arch):
    lm, theirs = peft_pair(tmp_path, arch)
    ids, mask = left_padded()
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=12)
    expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, tiny_model(arch).generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    sampling = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    ours = lm.generate(ids, **sampling)
    torch.manual_seed(3)
    assert torch.equal(ours, theirs.generate(input_ids=ids, **sampling))
    again = [lm.generate(ids, generator=torch.Generator().manual_seed(5), **sampling) for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_left_padding_gives_each_row_its_unpadded_tokens(tmp_path):
    """GPT-2 has absolute positions: padded rows must count positions from their first real token."""
    lm, _ = peft_pair(tmp_path, "gpt2")
    ids, mask = left_padded()
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=8)
    for row in range(len(ids)):
        alone = lm.generate(ids[row : row + 1, mask[row].argmax() :], max_new_tokens=8)
        assert torch.equal(out[row, -8:], alone[0, -8:])


def test_generate_is_the_argmax_of_forward_and_dora_nf4_work(tmp_path):
    lm, theirs = peft_pair(tmp_path, "llama", use_dora=True)
    ids = token_batch(2, 5)
    assert torch.equal(lm.generate(ids, max_new_tokens=6), theirs.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    q = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets="all-linear", quantize="nf4", blocksize=32))
    with torch.no_grad():
        for _, p in q.named_lora_parameters():
            p.normal_(std=0.2)
    q.eval()
    out = q.generate(ids, max_new_tokens=6)
    loop = ids
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole prefix through the training graph each step
            loop = torch.cat([loop, q(loop).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, loop)


def test_mixed_adapter_rows_each_equal_that_adapter_alone(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", ADAPTERS)
    lm = serving_model("llama", dirs)
    theirs = peft_oracle("llama", dirs)
    rows = ["sql", "chat", "__base__", "tiny"]
    ids = token_batch(len(rows), 5)
    out = lm.generate(ids, adapter_ids=rows, max_new_tokens=8)
    for i, name in enumerate(rows):
        if name == "__base__":
            with theirs.disable_adapter():
                expected = theirs.generate(input_ids=ids[i : i + 1], max_new_tokens=8, do_sample=False)
        else:
            theirs.set_adapter(name)
            expected = theirs.generate(input_ids=ids[i : i + 1], max_new_tokens=8, do_sample=False)
        assert torch.equal(out[i : i + 1], expected), name
    with lm.disable_adapters():
        base = lm.generate(ids, max_new_tokens=8)
        with pytest.raises(GenerationError, match="disable_adapters"):
            lm.generate(ids, adapter_ids=rows, max_new_tokens=2)
    assert torch.equal(base, tiny_model("llama").generate(ids, max_new_tokens=8, do_sample=False))
    with pytest.raises(Exception, match="nope"):
        lm.generate(ids, adapter_ids=["nope"] * 4, max_new_tokens=2)
    with pytest.raises(ValueError, match="adapter id 9 is out of range"):
        lm.generate(ids, adapter_ids=[0, 1, 9, -1], max_new_tokens=2)


def test_decode_graph_holds_the_store_tensors_and_sees_a_new_adapter(tmp_path):
    lm, theirs = peft_pair(tmp_path / "a", "llama")
    ids = token_batch(2, 5)
    lm.generate(ids, max_new_tokens=2)
    decoder = next(v for k, v in lm._views.items() if k[0] == "decode")
    store = {id(t) for t in [*lm.graph_module.parameters(), *lm.graph_module.buffers()]}
    own = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if id(t) not in store]
    assert own and all(n.startswith(CACHE) or n.startswith("lifted_tensor") for n in own), own
    _, theirs = peft_pair(tmp_path / "b", "llama", seed=8)
    lm.load_adapter(tmp_path / "b")  # same shapes, new values: the decode graph reads them in place
    assert torch.equal(lm.generate(ids, max_new_tokens=8), theirs.generate(input_ids=ids, max_new_tokens=8, do_sample=False))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.zero_()
    assert torch.equal(lm.generate(ids, max_new_tokens=8), tiny_model("llama").generate(ids, max_new_tokens=8, do_sample=False))


def test_generate_decode_graph_computes_the_head_on_the_last_position_only(tmp_path):
    """As transformers' generate (logits_to_keep=1): a prefill skips the output head on every
    other prompt position, and the last position's logits equal a forward's."""
    lm, _ = peft_pair(tmp_path, "llama")
    ids, mask = left_padded(batch=2, seq=7)
    lm.generate(ids, attention_mask=mask, max_new_tokens=1)
    key, decoder = next((k, v) for k, v in lm._views.items() if k[0] == "decode")
    cache_len = key[2]
    full = torch.zeros(2, cache_len, dtype=torch.long)
    full[:, :7] = mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = decoder(input_ids=ids, attention_mask=full, position_ids=positions, cache_position=torch.arange(7))
        forward = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert logits.shape == (2, 1, forward.shape[-1])
    torch.testing.assert_close(logits[:, 0], forward[:, -1], atol=1e-5, rtol=1e-5)


def test_eos_rows_continue_with_pad_and_decoding_stops_when_all_finished(tmp_path):
    lm, theirs = peft_pair(tmp_path, "qwen2")
    ids = token_batch(2, 5)
    free = lm.generate(ids, max_new_tokens=10)
    eos = int(free[0, 7])  # row 0 meets it at its third new token
    ours = lm.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    expected = theirs.generate(input_ids=ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, do_sample=False)
    assert torch.equal(ours, expected)
    assert ours[0, 8:].eq(0).all()
    first = lm.generate(ids[:1], max_new_tokens=10, eos_token_id=eos)
    assert first.shape[1] == 8 and first[0, -1] == eos


def test_merge_and_unload_gives_an_independent_transformers_model(tmp_path):
    for arch in ["llama", "gpt2"]:  # gpt2: tied embeddings, Conv1D layers
        lm, theirs = peft_pair(tmp_path / arch, arch)
        hf = lm.merge_and_unload()
        assert type(hf) is type(tiny_model(arch))
        ids = token_batch(2, 6)
        assert torch.equal(hf.generate(ids, max_new_tokens=8, do_sample=False), lm.generate(ids, max_new_tokens=8))
        peft_merged = theirs.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, peft_merged(ids).logits, rtol=1e-5, atol=1e-5)
        hf.save_pretrained(tmp_path / f"{arch}-merged")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}-merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
            before = lm(ids).logits
            for p in hf.parameters():
                p.add_(1.0)
            torch.testing.assert_close(lm(ids).logits, before)  # the LoraModel does not see hf's change
    q = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=["q_proj"], quantize="nf4", blocksize=32))
    hf = q.merge_and_unload()
    assert all(p.dtype == torch.float32 and 0 not in p.stride() for p in hf.parameters())
    assert torch.equal(hf.generate(ids, max_new_tokens=6, do_sample=False), q.eval().generate(ids, max_new_tokens=6))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    lm = lorafx.transform(plain, lorafx.LoraSpec(r=2, targets=["0", "2"]), example_args=(x,))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_()
        merged = lm.merge_and_unload()
        assert type(merged) is torch.nn.Sequential
        torch.testing.assert_close(merged(x), lm(x))


def test_generate_refuses_what_it_cannot_do_by_name(tmp_path):
    lm, _ = peft_pair(tmp_path, "gpt2")  # n_positions 64
    ids = token_batch(2, 5)
    with pytest.raises(GenerationError, match=r"5 tokens\) \+ max_new_tokens \(60\) = 65 .*max_position_embeddings \(64\)"):
        lm.generate(ids, max_new_tokens=60)
    with pytest.raises(GenerationError, match="num_beams"):
        lm.generate(ids, num_beams=4)
    with pytest.raises(GenerationError, match="right padding"):
        lm.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    with pytest.raises(GenerationError, match="vocabulary"):
        lm.generate(ids + 1000)
    with pytest.raises(GenerationError, match="temperature"):
        lm.generate(ids, do_sample=True, temperature=0)
    with pytest.raises(GenerationError, match="2-D integer"):
        lm.generate(ids.float())
    given = transformers.GenerationConfig(max_new_tokens=3, top_k=0, min_p=0.1)  # a call's config replaces the model's
    with pytest.raises(GenerationError, match="min_p"):
        lm.generate(ids, generation_config=given)
    given.min_p = None
    assert lm.generate(ids, generation_config=given).shape == (2, 8)
    lm.generation_config.repetition_penalty = 1.3
    with pytest.raises(GenerationError, match="repetition_penalty"):
        lm.generate(ids)
    plain = lorafx.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorafx.LoraSpec(r=2, targets=["0"]),
                             example_args=(torch.randn(2, 4),))
    with pytest.raises(GenerationError, match="Hugging Face language model"):
        plain.generate(ids)


def test_compiled_generate_gives_the_eager_tokens():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets="all-linear"))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.2)
    lm.eval()
    ids, mask = left_padded()
    eager = lm.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=8, compile=True), eager)
    with pytest.raises(GenerationError, match="compile="):
        lm.generate(ids, compile="yes")
