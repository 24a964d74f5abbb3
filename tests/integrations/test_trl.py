"""TRL's SFTTrainer (plain and packed), DPOTrainer and GRPOTrainer train a LoraModel unpatched; the packed
loss is the HF + PEFT model's on the same packed batch."""

import copy

import datasets
import peft
import pytest
import torch
import transformers
import trl
from conftest import VOCAB, tiny_model

import lorafx

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]


def word_tokenizer():
    """A real transformers fast tokenizer (WordLevel, whitespace) built offline; ids match conftest's config."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def texts(rows=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (rows,), generator=g)
    return [" ".join(WORDS[i] for i in torch.randint(3, VOCAB, (int(n),), generator=g)) for n in lengths]


def sft_config(out, **kw):
    defaults = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to=[],
                    save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True, max_length=32, logging_steps=1)
    return trl.SFTConfig(**{**defaults, **kw})


def peft_twin(base, lm):
    """PEFT's model of `base` with lm's adapter weights."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
            state["base_model.model." + name] = p.detach().clone()
    peft.set_peft_model_state_dict(theirs, state)
    return theirs


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_loss_is_peft_models_and_trains(tmp_path, packing):
    base = tiny_model("llama")
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, alpha=8))
    theirs = peft_twin(base, lm)
    ds = datasets.Dataset.from_dict({"text": texts()})
    ours = trl.SFTTrainer(model=lm, args=sft_config(tmp_path / "ours", packing=packing), train_dataset=ds,
                          processing_class=word_tokenizer())
    peer = trl.SFTTrainer(model=theirs, args=sft_config(tmp_path / "peft", packing=packing), train_dataset=ds,
                          processing_class=word_tokenizer())
    batch = next(iter(ours.get_train_dataloader()))
    if packing:  # several documents per row, told apart by position_ids restarting at 0
        assert "position_ids" in batch and int((batch["position_ids"] == 0).sum()) > batch["input_ids"].shape[0]
    with torch.no_grad():
        expected = peer.compute_loss(theirs, batch)
        torch.testing.assert_close(ours.compute_loss(lm, batch), expected, rtol=0, atol=1e-5)
    before = {name: p.detach().clone() for name, p in lm.named_lora_parameters()}
    ours.train()
    assert all(not torch.equal(p, before[name]) for name, p in lm.named_lora_parameters())


def test_dpo_trainer_with_ref_model_none_uses_the_base_model(tmp_path):
    base = tiny_model("llama")
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, alpha=8))
    with torch.no_grad():  # a non-zero adapter: the policy differs from the base from the start
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
    words = texts(18, seed=3)
    pairs = datasets.Dataset.from_dict({"prompt": words[:6], "chosen": words[6:12], "rejected": words[12:]})
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                         report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, max_length=32, logging_steps=1,
                         bf16=False)  # TRL defaults to bf16 autocast; fp32 for an exact comparison
    DPOTrainer = lorafx.adapter_trainer(trl.DPOTrainer)
    trainer = DPOTrainer(model=lm, ref_model=None, args=args, train_dataset=pairs, processing_class=word_tokenizer())
    assert isinstance(trainer.ref_model, lorafx.integrations.trainer.ReferenceModel)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(trainer.ref_model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    before = {name: p.detach().clone() for name, p in lm.named_lora_parameters()}
    trainer.train()
    assert all(not torch.equal(p, before[name]) for name, p in lm.named_lora_parameters())


def test_grpo_trainer_generates_and_trains_with_peft_models_logprobs(tmp_path):
    """GRPO samples completions with lm.generate (TRL passes its own generation_config) and scores
    them with per-token log-probs equal to the HF + PEFT model's."""
    base = tiny_model("llama")
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, alpha=8, targets="all-linear"))
    theirs = peft_twin(base, lm)
    prompts = datasets.Dataset.from_dict({"prompt": texts(8, seed=1)})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=2,
                          max_completion_length=6, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                          bf16=False, disable_tqdm=True, logging_steps=1, seed=0)
    def grpo(model):  # the trainer patches the model's forward with TRL's fused LM head
        return trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                               args=args, train_dataset=prompts, processing_class=word_tokenizer())

    trainer, peer = grpo(lm), grpo(theirs)
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt, as GRPO builds them
    with torch.no_grad():
        ours, _, _ = trainer._get_per_token_logps_and_entropies(lm, ids, mask, logits_to_keep=6)
        expected, _, _ = peer._get_per_token_logps_and_entropies(theirs, ids, mask, logits_to_keep=6)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    before = {name: p.detach().clone() for name, p in lm.named_lora_parameters()}
    trainer.train()
    assert all(not torch.equal(p, before[name]) for name, p in lm.named_lora_parameters())
