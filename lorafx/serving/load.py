"""The model `lorafx serve` runs: a base checkpoint (optionally NF4) with named adapters resident.

The base is transformed with a rank-1 LoRA whose B is zero — the hidden "default" slot of the
bank, equal to the base model — on the first adapter's targets (or every linear layer), so the
bank starts where most adapters put their weights; adapters on other layers add banks when
they load. Every served adapter is then a named adapter of one LoraModel.
"""

from __future__ import annotations

import os

from lorafx.core.named_adapters import DEFAULT
from lorafx.core.pretrained import from_pretrained, tokenizer_of
from lorafx.core.spec import LoraSpec
from lorafx.formats.adapters import read_config


def load(base_dir: str, adapters: dict[str, str], quantize: str | None = None):
    """(LoraModel, tokenizer) for serving `adapters` (name → folder) over `base_dir`."""
    base_dir = os.fspath(base_dir)
    tokenizer = tokenizer_of(base_dir)
    if tokenizer is None:
        raise ValueError(f"{base_dir} has no tokenizer (tokenizer.json or tokenizer_config.json): serving needs one")
    for name, path in adapters.items():
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is reserved for the model's own adapter; name the adapter otherwise")
        if not os.path.isdir(path):
            raise ValueError(f"adapter {name!r}: {path} is not a folder")
    targets = "all-linear"
    if adapters:
        first = read_config(next(iter(adapters.values())))
        if isinstance(first.get("target_modules"), (list, str)) and first["target_modules"]:
            targets = first["target_modules"]
    lm = from_pretrained(base_dir, LoraSpec(r=1, alpha=1, targets=targets, quantize=quantize), progress=False)
    lm.eval()
    for name, path in adapters.items():
        lm.load_adapter(path, name=name)
    return lm, tokenizer
