"""LoraModel.generate: greedy and sampled decoding on the decode graph, as transformers' generate.

The prompt runs once through the decode graph (prefill), then each step feeds one token per
row. Left padding works as in transformers: position ids count only the real tokens
(cumsum of the attention mask − 1), padded positions are masked. Sampling applies
temperature, then top-k, then top-p (transformers' order, keeping at least one token) and
draws with torch.multinomial, from `generator` when given. Rows that produced an EOS token
continue with the pad token; decoding stops when every row has finished.
"""

from __future__ import annotations

import torch

from lorafx.core import named_adapters

from .decode import GenerationError, capture_decoder

BUCKET = 64  # cache lengths are rounded up to a multiple of this, so similar calls share a graph


def generate(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id=None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    adapter_ids=None,
    max_length: int | None = None,
    use_cache: bool = True,
    streamer=None,
    compile: bool = False,
    generation_config=None,
    **unsupported,
) -> torch.Tensor:
    """See LoraModel.generate."""
    if unsupported:
        raise GenerationError(
            f"generate does not support {sorted(unsupported)}; it takes max_new_tokens/max_length, do_sample, "
            "temperature, top_k, top_p, eos_token_id, pad_token_id, attention_mask, generator, adapter_ids, streamer, compile, "
            "generation_config"
        )
    if not isinstance(compile, bool):
        raise GenerationError(f"compile={compile!r} is invalid: allowed is True or False")
    if lm.config is None or lm.generation_config is None:
        raise GenerationError(f"generate needs a Hugging Face language model; {lm.model_class} has no decode path")
    if use_cache is not True:
        raise GenerationError("generate always decodes with a static KV cache: use_cache must be True")
    # A generation_config given to the call replaces the model's, as in transformers (TRL's GRPO passes one).
    config = settings(lm.generation_config if generation_config is None else generation_config)
    input_ids, attention_mask = _check_inputs(lm, input_ids, attention_mask)
    batch, prompt = input_ids.shape
    if max_new_tokens is None and max_length is not None:
        max_new_tokens = max_length - prompt if isinstance(max_length, int) else max_length
    if max_new_tokens is None:
        max_new_tokens = config["max_new_tokens"] if config["max_new_tokens"] is not None else max(0, config["max_length"] - prompt)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    do_sample = config["do_sample"] if do_sample is None else do_sample
    temperature = config["temperature"] if temperature is None else temperature
    top_k = config["top_k"] if top_k is None else top_k
    top_p = config["top_p"] if top_p is None else top_p
    check_sampling(temperature, top_k, top_p)
    eos = token_list(config["eos_token_id"] if eos_token_id is None else eos_token_id, "eos_token_id")
    pad = config["pad_token_id"] if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0  # transformers: pad_token_id = eos_token_id
    limit = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
    total = prompt + max_new_tokens
    if limit is not None and total > limit:
        raise GenerationError(
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise GenerationError(f"streamer must have put() and end() (a transformers TextStreamer), got {type(streamer).__name__}")
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return input_ids
    cache_len = -(-total // BUCKET) * BUCKET
    cache_len = min(cache_len, limit) if limit is not None else cache_len
    if lm._disabled and adapter_ids is not None:
        raise GenerationError("adapter_ids= cannot be used inside disable_adapters()")
    key = ("decode", batch, cache_len, lm._disabled)
    if key not in lm._views:  # each decode graph holds its own cache: keep the newest two
        for old in [k for k in lm._views if k[0] == "decode" and len(k) == len(key)][:-1]:
            del lm._views[old]
            lm._views.pop((*old, "compiled"), None)
    decoder = lm.entry_point(key, lambda: capture_decoder(lm, batch, cache_len, lm._disabled, last_only=True))
    if lm._adapters is not None or adapter_ids is not None:
        if not lm._disabled:
            named_adapters.write_ids(lm, batch, adapter_ids, gm=decoder)
    if compile:  # the decode graph through backend "lorafx" (prefill and step: two compiled graphs)
        decoder = lm.entry_point((*key, "compiled"), lambda: torch.compile(decoder, backend="lorafx", dynamic=True))

    device = input_ids.device
    mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
    mask[:, :prompt] = attention_mask  # cache slots not written yet stay 0: stale keys of a past call are masked
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, device=device) if eos else None
    tokens = [input_ids]
    with torch.no_grad():
        logits = decoder(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache_position=torch.arange(prompt, device=device)
        )
        next_position = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            scores = logits[:, -1, :].float()
            if do_sample:
                probs = torch.softmax(warp(scores, temperature, top_k, top_p), dim=-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                chosen = scores.argmax(-1)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
            tokens.append(chosen[:, None])
            if streamer is not None:
                streamer.put(chosen.cpu())
            if eos_t is not None:
                unfinished &= ~torch.isin(chosen, eos_t)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            where = prompt + step
            mask[:, where] = 1
            logits = decoder(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position,
                cache_position=torch.tensor([where], device=device),
            )
            next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return torch.cat(tokens, dim=1)


# transformers' generate defaults for what generation_config leaves unset (GenerationConfig.
# _get_default_generation_params), and the settings lorafx does not implement, at their no-op value.
DEFAULTS = {"max_length": 20, "max_new_tokens": None, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
NO_OP = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
         "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None,
         "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
         "forced_eos_token_id": None, "num_return_sequences": 1, "penalty_alpha": None, "length_penalty": 1.0}


def settings(generation_config) -> dict:
    """generate's defaults: the model's generation_config over transformers' defaults; a setting
    lorafx does not apply (repetition_penalty, beams, ...) is refused by name, not ignored."""
    config = dict(DEFAULTS)
    if generation_config is None:
        return config | {"eos_token_id": None, "pad_token_id": None}
    for field, no_op in NO_OP.items():
        value = getattr(generation_config, field, None)
        if value is not None and value != no_op:
            raise GenerationError(
                f"generation_config sets {field}={value!r}, which lorafx's generate does not implement; "
                f"set generation_config.{field} = {no_op!r} (lm.generation_config for the model's) to decode without it"
            )
    for field in (*DEFAULTS, "eos_token_id", "pad_token_id"):
        value = getattr(generation_config, field, None)
        if value is not None or field not in config:
            config[field] = value
    return config


def _check_inputs(lm, input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise GenerationError(f"input_ids must be a 2-D integer tensor (batch, prompt length), got {got}")
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids has no tokens: generate needs a prompt of at least one token")
    input_ids = input_ids.long()
    vocab = getattr(lm.config.get_text_config(), "vocab_size", None)
    if vocab is not None and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise GenerationError(f"input_ids holds token id {int(input_ids.max())}/{int(input_ids.min())}; the vocabulary has ids 0..{vocab - 1}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise GenerationError(f"attention_mask has shape {got}, input_ids {tuple(input_ids.shape)}: they must match")
    attention_mask = attention_mask.long()
    if bool((attention_mask[:, -1] == 0).any()):
        raise GenerationError(
            "attention_mask ends in 0 for some row: right padding; generate needs left padding "
            "(tokenizer.padding_side = 'left'), as transformers' generate does"
        )
    return input_ids, attention_mask


def check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise GenerationError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise GenerationError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be a number with 0 < top_p <= 1, got {top_p!r}")


def token_list(value, field) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise GenerationError(f"{field} must be a token id >= 0 or a list of them, got {value!r}")
    return list(values)


def warp(scores, temperature, top_k, top_p):
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores
