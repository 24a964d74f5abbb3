"""Supervised fine-tuning with TRL's SFTTrainer on a lorafx LoraModel (CPU, well under 2 minutes).

A tiny random-init Llama built from a config and a word-level tokenizer built locally (nothing
is downloaded) learn a handful of sentences with sequence packing; the saved adapter is a PEFT
adapter folder, reloaded with both lorafx and PEFT at the end.

    python examples/sft_trl.py [--out out/sft] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy

import datasets
import peft
import tokenizers
import torch
import transformers
import trl

import lorafx

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the rug",
    "a bird sang in the tree",
    "the sun rose over the hill",
    "a fish swam in the pond",
    "the cat chased the bird",
    "the dog chased the cat",
    "rain fell on the hill",
]


def word_tokenizer(sentences: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A real transformers fast tokenizer over the sentences' words (WordLevel, whitespace)."""
    words = ["<pad>", "<s>", "</s>"] + sorted({w for s in sentences for w in s.split()})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/sft")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = word_tokenizer(SENTENCES)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    base = transformers.LlamaForCausalLM(config)
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=8, alpha=16))
    lm.print_trainable_parameters()

    SFTTrainer = lorafx.adapter_trainer(trl.SFTTrainer)  # checkpoints and save_model write PEFT adapter folders
    trainer = SFTTrainer(
        model=lm,
        args=trl.SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=5e-3,
                           packing=True, max_length=32, logging_steps=10, save_strategy="no", report_to=[],
                           use_cpu=True, bf16=False, disable_tqdm=True),
        train_dataset=datasets.Dataset.from_dict({"text": SENTENCES * 4}),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(f"{args.out}/adapter")

    ours = lorafx.LoraModel.from_pretrained(copy.deepcopy(base), f"{args.out}/adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{args.out}/adapter").eval()
    ids = tokenizer("the cat sat on the", return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    new = ours.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]
    print(f"adapter saved to {args.out}/adapter; PEFT's logits differ by {difference:.1e}")
    print(f"'the cat sat on the' -> {tokenizer.decode(new)!r}")


if __name__ == "__main__":
    main()
