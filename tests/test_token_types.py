"""BERT-family inputs: `lm(**tokenizer(a, b))` with token_type_ids, as PEFT runs it."""

import copy

import peft
import pytest
import torch
import transformers

import lorafx

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT sequence classifier, a PEFT LoRA model of it (random B), and a real BERT tokenizer."""
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # segment B must differ from A for the test to see token_type_ids
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 1)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)).eval()
    return model, theirs, tokenizer


def test_sentence_pairs_give_peft_logits(bert, tmp_path):
    model, theirs, tokenizer = bert
    theirs.save_pretrained(tmp_path)
    ours = lorafx.LoraModel.from_pretrained(copy.deepcopy(model), tmp_path)
    batch = tokenizer(["the cat sat", "a dog"], ["on a mat", "ran far far"], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].any()  # a real pair: segment B is type 1
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        # Without token_type_ids both run type 0 everywhere, as BERT itself does.
        plain = {k: v for k, v in batch.items() if k != "token_type_ids"}
        torch.testing.assert_close(ours(**plain).logits, theirs(**plain).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(**plain).logits, expected)
    labels = torch.tensor([0, 2])
    ours.train()
    loss = ours(**batch, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "types, message",
    [
        (lambda t: t[:, :2], r"token_type_ids has shape \(2, 2\)"),
        (lambda t: t.float(), "integer segment ids"),
        (lambda t: t + 2, r"token_type_ids holds 3; the model has type_vocab_size=2 \(0..1\)"),
        (lambda t: t - 1, "token_type_ids holds -1"),
    ],
)
def test_bad_token_type_ids_are_named(bert, types, message):
    model, _, tokenizer = bert
    lm = lorafx.transform(copy.deepcopy(model), lorafx.LoraSpec(r=2, targets=["query"]))
    batch = tokenizer(["the cat"], ["a mat"], return_tensors="pt")
    batch = {k: v.expand(2, -1) for k, v in batch.items()}
    with pytest.raises(ValueError, match=message):
        lm(**{**batch, "token_type_ids": types(batch["token_type_ids"])})


def test_token_type_ids_where_the_model_takes_none():
    """All zeros (a tokenizer's single texts, kept by Trainer as a forward column) are ignored, as
    transformers' decoders ignore them; segment ids a model cannot read are refused."""
    from conftest import tiny_model, token_batch

    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=2, targets=["q_proj"])).eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, token_type_ids=torch.zeros_like(ids)).logits, lm(ids).logits)
    with pytest.raises(TypeError, match=r"unsupported inputs \['token_type_ids'\]"):
        lm(ids, token_type_ids=torch.ones_like(ids))


def test_trainer_with_padding_collator_keeps_token_types_and_trains_as_peft(bert, tmp_path):
    """Trainer keeps the dataset columns forward names; DataCollatorWithPadding pads token_type_ids."""
    import datasets

    model, theirs, tokenizer = bert
    theirs = copy.deepcopy(theirs).train()
    theirs.save_pretrained(tmp_path / "start")
    ours = lorafx.LoraModel.from_pretrained(copy.deepcopy(model), tmp_path / "start", is_trainable=True).train()
    pairs = tokenizer(["the cat sat", "a dog", "the mat", "a cat ran far"], ["on a mat", "ran far far", "sat", "the"])
    rows = datasets.Dataset.from_dict({**pairs, "label": [0, 2, 1, 0]})
    args = dict(per_device_train_batch_size=2, learning_rate=1e-2, max_steps=2, report_to=[], save_strategy="no",
                seed=0, disable_tqdm=True, use_cpu=True)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    for lm, out in ((theirs, "peft"), (ours, "ours")):
        training = transformers.TrainingArguments(output_dir=str(tmp_path / out), **args)
        transformers.Trainer(model=lm, args=training, train_dataset=rows, data_collator=collator).train()
    state = peft.get_peft_model_state_dict(theirs)
    lora = [(n, p) for n, p in ours.named_lora_parameters() if ".lora_" in n]
    assert lora and max((p - state["base_model.model." + n]).abs().max().item() for n, p in lora) <= 1e-5
