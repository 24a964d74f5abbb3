"""LoraConfig fields lorafx does not implement: an adapter that sets one fails naming it, on every
way in (load_adapter, named loads, LoraModel.from_pretrained, LoraSpec.from_peft_config,
combine_adapters, the CLI); fields that do not change what the adapter computes load as PEFT's."""

import copy
import json
import re
import warnings

import peft
import pytest
import torch
import transformers
from conftest import COMMON, token_batch
from peft.tuners.lora.config import KasaConfig, MontecloraConfig, VeloraConfig

import lorafx
from lorafx.formats.adapters import IMPLEMENTED, PER_LAYER, READ_AS_IS, UNIMPLEMENTED
from lorafx.tools import cli

TARGETS = ["q_proj", "v_proj"]


def base_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()


def peft_adapter(folder, **fields):
    """A PEFT adapter saved with `fields` set, its LoRA weights random (a non-trivial adapter); its model."""
    fields.setdefault("target_modules", TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about several of these fields
        model = peft.get_peft_model(base_model(), peft.LoraConfig(r=4, lora_alpha=8, **fields)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def edited(folder, src, **fields):
    """A copy of the adapter folder `src` with `fields` written into its adapter_config.json."""
    folder.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain PEFT adapter folder, a lorafx model it loads into, and a base checkpoint for the CLI."""
    root = tmp_path_factory.mktemp("fields")
    peft_adapter(root / "plain")
    base_model().save_pretrained(root / "base")
    lm = lorafx.transform(base_model(), lorafx.LoraSpec(r=4, alpha=8, targets=TARGETS))
    return root, lm


# Set with PEFT itself where it builds the adapter on a CPU Llama; megatron_config needs megatron
# and use_bdlora / arrow_config their own model setups, so those are written into the config.
SET_BY_PEFT = [
    ("bias", dict(bias="all")),
    ("bias", dict(bias="lora_only")),
    ("lora_bias", dict(lora_bias=True)),
    ("rank_pattern", dict(rank_pattern={"q_proj": 2})),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": 2})),
    ("trainable_token_indices", dict(trainable_token_indices=[3, 4])),
    ("layer_replication", dict(layer_replication=[[0, 2], [1, 2]])),
    ("target_parameters", dict(target_parameters=["mlp.down_proj.weight"])),
    ("alora_invocation_tokens", dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")),
    ("kasa_config", dict(kasa_config=KasaConfig())),
    ("monteclora_config", dict(monteclora_config=MontecloraConfig())),
    ("use_qalora", dict(use_qalora=True)),
    ("init_lora_weights", dict(init_lora_weights="olora")),
    ("ensure_weight_tying", dict(ensure_weight_tying=True, modules_to_save=["lm_head"])),
]
WRITTEN = [
    ("megatron_config", dict(megatron_config={"tensor_model_parallel_size": 2})),
    ("use_bdlora", dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2})),
    ("arrow_config", dict(arrow_config={"top_k": 2})),
    ("layers_pattern", dict(layers_pattern="layers")),
    ("layers_to_transform", dict(layers_to_transform=[0], target_modules=".*q_proj")),
    ("init_lora_weights", dict(init_lora_weights="corda")),
    ("init_lora_weights", dict(init_lora_weights="lora_ga")),
    ("loftq_config.loftq_bits", dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})),
    ("ensure_weight_tying", dict(ensure_weight_tying=True, target_modules=["q_proj", "lm_head"])),
    ("lora_bias", dict(lora_bias=1)),
    ("some_future_field", dict(some_future_field={"on": True})),
]


def refusals(root, lm, folder):
    """Every way an adapter folder is read, each a call that must raise."""
    yield "LoraSpec.from_peft_config", lambda: lorafx.LoraSpec.from_peft_config(folder)
    yield "load_adapter", lambda: lm.load_adapter(folder)
    yield "named load", lambda: lm.load_adapter(folder, name="other")
    yield "LoraModel.from_pretrained", lambda: lorafx.LoraModel.from_pretrained(base_model(), folder)
    yield "combine_adapters", lambda: lorafx.combine_adapters([folder], [1.0], root / "combined")


def assert_refused_everywhere(root, lm, folder, field, capsys):
    before = {n: p.clone() for n, p in lm.named_lora_parameters()}
    for way, call in refusals(root, lm, folder):
        if way == "combine_adapters" and field in PER_LAYER:
            continue  # combine applies rank_pattern / alpha_pattern per layer (tests/reliability/test_values.py)
        try:
            call()
        except lorafx.AdapterError as e:
            assert re.search(rf"\b{field}=", str(e)) and str(folder) in str(e), (way, e)
        else:
            raise AssertionError(f"{way} loaded an adapter with {field} set")
    assert all(torch.equal(p, before[n]) for n, p in lm.named_lora_parameters())
    assert not (root / "combined").exists()
    capsys.readouterr()
    assert cli.main(["merge", str(root / "base"), str(folder), str(root / "merged")]) != 0
    assert f"{field}=" in capsys.readouterr().err
    assert not (root / "merged").exists()


@pytest.mark.parametrize("field, fields", SET_BY_PEFT, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SET_BY_PEFT)])
def test_peft_adapter_with_an_unimplemented_field_is_refused_naming_it(plain, tmp_path, field, fields, capsys):
    root, lm = plain
    peft_adapter(tmp_path / "adapter", **fields)
    assert_refused_everywhere(root, lm, tmp_path / "adapter", field, capsys)


@pytest.mark.parametrize("field, fields", WRITTEN, ids=[f"{f}-{i}" for i, (f, _) in enumerate(WRITTEN)])
def test_config_with_an_unimplemented_field_is_refused_naming_it(plain, tmp_path, field, fields, capsys):
    root, lm = plain
    folder = edited(tmp_path / "adapter", root / "plain", **fields)
    assert_refused_everywhere(root, lm, folder, field, capsys)


def test_peft_config_object_with_an_unimplemented_field_is_refused():
    with pytest.raises(lorafx.AdapterError, match=r"LoraConfig: layer_replication=\[\[0, 2\]\] is not supported"):
        lorafx.LoraSpec.from_peft_config(peft.LoraConfig(target_modules=TARGETS, layer_replication=[[0, 2]]))


def test_every_peft_lora_config_field_is_classified():
    """A field added to PEFT's LoraConfig must be sorted into one of the tables by someone who read it."""
    known = set(UNIMPLEMENTED) | set(PER_LAYER) | set(READ_AS_IS) | set(IMPLEMENTED)
    assert set(peft.LoraConfig.__dataclass_fields__) - known == set()


# Non-default values that leave the forward of a loaded adapter as it is: PEFT's logits.
ACCEPTED = [
    dict(),
    dict(fan_in_fan_out=True),  # PEFT resets it to False on nn.Linear
    dict(init_lora_weights=False),
    dict(init_lora_weights="gaussian"),
    dict(init_lora_weights="orthogonal"),
    dict(init_lora_weights="mica"),
    dict(init_lora_weights="nora"),
    dict(init_lora_weights="eva"),
    dict(velora_config=VeloraConfig(num_groups=4)),  # its buffers serve the backward only
    dict(ensure_weight_tying=True),  # no tied layer adapted or saved: PEFT only warns
    dict(qalora_group_size=32, megatron_core="my.megatron"),  # read only with use_qalora / megatron_config
    dict(loftq_config={"loftq_bits": 8, "loftq_iter": 3}),  # ignored unless init_lora_weights="loftq"
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=[",".join(f) or "defaults" for f in ACCEPTED])
def test_fields_that_do_not_change_the_forward_load_with_peft_logits(plain, tmp_path, fields):
    theirs = peft_adapter(tmp_path / "adapter", **copy.deepcopy(fields))
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        ours = lorafx.LoraModel.from_pretrained(base_model(), tmp_path / "adapter")
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        lm = lorafx.transform(base_model(), lorafx.LoraSpec(r=4, alpha=8, targets=TARGETS)).eval()
        lm.load_adapter(tmp_path / "adapter", name="accepted")
        lm.set_adapter("accepted")
        torch.testing.assert_close(lm(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_unknown_field_left_off_loads(plain, tmp_path):
    root, lm = plain
    folder = edited(tmp_path / "adapter", root / "plain", some_future_field=None, another_future_field=False)
    lm.load_adapter(folder)
    assert lorafx.LoraSpec.from_peft_config(folder).r == 4


def test_loftq_adapter_of_other_rounds_is_refused(tmp_path):
    """Each LoftQ round changes the NF4 base, so an adapter fitted with other rounds is another base's."""
    spec = lorafx.LoraSpec(r=4, alpha=8, targets=TARGETS, init="loftq", quantize="nf4", loftq_iter=1)
    lm = lorafx.transform(base_model(), spec)
    lm.save_adapter(tmp_path / "one")
    lm.load_adapter(tmp_path / "one")
    folder = edited(tmp_path / "two", tmp_path / "one", loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    for load in (lambda: lm.load_adapter(folder), lambda: lm.load_adapter(folder, name="two")):
        with pytest.raises(lorafx.AdapterError, match=r"loftq_config.loftq_iter=2, but this model .* loftq_iter=1"):
            load()
