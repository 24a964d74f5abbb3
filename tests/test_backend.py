"""torch.compile(backend="lorafx") on real tiny HF decoders: found by name, one graph, no
recompiles, same outputs and gradients as eager. Compiles are slow on CPU, so each test
compiles one one-layer model once."""

import subprocess
import sys

import pytest
import torch
import transformers
from conftest import COMMON, token_batch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lorafx
from lorafx.core.backend import BackendOptionsError, lorafx_backend

# Compiled vs eager: Inductor fuses and reorders float math; bf16 rounds each intermediate.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def one_layer_model(arch, dtype=torch.float32):
    """A tiny decoder with one layer: compile time grows with the graph."""
    torch.manual_seed(0)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = config_class(**{**COMMON, "num_hidden_layers": 1})
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def with_random_lora(lm):
    """B is zero at init, which would hide a wrong LoRA branch: give every LoRA weight values."""
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(0, 0.2)
    return lm


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_backend_is_found_by_name_without_importing_lorafx():
    code = (
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "backend = lookup_backend('lorafx')\n"
        "print(backend.__module__, backend.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["lorafx.core.backend", "lorafx_backend"]
    assert lookup_backend("lorafx") is lorafx_backend


def test_bad_options_name_the_problem():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    allowed = r"allowed: \['fuse', 'inductor_config'\]"
    with pytest.raises(BackendOptionsError, match=r"unknown options \['fusion'\]; " + allowed):
        lorafx_backend(gm, [torch.ones(2)], options={"fusion": True})
    with pytest.raises(BackendOptionsError, match="fuse='yes' is invalid"):
        lorafx_backend(gm, [torch.ones(2)], options={"fuse": "yes"})
    with pytest.raises(BackendOptionsError, match=r"unknown Inductor config names \['max_autotun'\]"):
        lorafx_backend(gm, [torch.ones(2)], options={"inductor_config": {"max_autotun": True}})
    with pytest.raises(BackendOptionsError, match="options must be a dict"):
        lorafx_backend(gm, [torch.ones(2)], options=["fuse"])
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):  # torch.compile(mode=...) reaches Inductor
        lorafx_backend(gm, [torch.ones(2)], mode="fastest")
    # Through torch.compile the same message reaches the user at the first call, wrapped by Dynamo.
    compiled = torch.compile(lambda x: x + 1, backend="lorafx", options={"fusion": True})
    failed = torch._dynamo.exc.BackendCompilerFailed
    with pytest.raises(failed, match=r"BackendOptionsError: .*unknown options \['fusion'\]"):
        compiled(torch.ones(2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_one_graph_no_breaks(arch, quantize):
    lm = lorafx.transform(one_layer_model(arch), lorafx.LoraSpec(r=4, alpha=8, dropout=0.1, quantize=quantize))
    ids = token_batch()
    explained = torch._dynamo.explain(lm.train())(input_ids=ids, labels=ids)  # the training call
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_qlora_bf16_equals_eager_without_recompiles():
    """bf16 QLoRA: lorafx::nf4_dequant runs as an Inductor fallback kernel. (float32 outputs
    are compared in the training test: one compile per test keeps the file fast.)"""
    dtype = torch.bfloat16
    spec = lorafx.LoraSpec(r=4, alpha=8, quantize="nf4")
    lm = with_random_lora(lorafx.transform(one_layer_model("llama", dtype), spec)).eval()
    counter = CompileCounterWithBackend("lorafx")
    compiled = torch.compile(lm, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch, seq in [(2, 7), (3, 12), (5, 4)]:
            ids = token_batch(batch, seq, seed=batch)
            torch.testing.assert_close(compiled(input_ids=ids).logits, lm(input_ids=ids).logits, **TOLERANCE[dtype])
    assert counter.frame_count == 1
    assert counters["lorafx"]["graphs"] == 1
    assert counters["lorafx"]["fuse_nf4_lora.nf4_lora"] == 0  # on CPU Inductor gets the aten ops


def test_compiled_fused_qlora_training_step_matches_eager_and_updates_only_lora():
    """fuse=True forces the fusion passes on CPU: AOTAutograd differentiates through
    lorafx::nf4_lora_linear's registered autograd, Inductor runs the op's CPU path."""
    spec = lorafx.LoraSpec(r=4, alpha=8, quantize="nf4")
    lm = with_random_lora(lorafx.transform(one_layer_model("qwen2"), spec)).train()
    ids = token_batch(2, 9)
    eager = lm(input_ids=ids, labels=ids, return_logits=True)  # compiled calls compute the full logits too
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}

    compiled = torch.compile(lm, backend="lorafx", fullgraph=True, options={"fuse": True})
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.optim.SGD(lm.trainable_parameters(), lr=0.1).step()

    torch.testing.assert_close(out.logits, eager.logits, **TOLERANCE[torch.float32])
    torch.testing.assert_close(out.loss, eager.loss, **TOLERANCE[torch.float32])
    grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    lora = {"graph_module." + n for n, _ in lm.named_lora_parameters()}
    assert set(grads) == set(eager_grads) == lora
    for name in lora:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOLERANCE[torch.float32])
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == lora
    assert counters["lorafx"]["graphs"] == 1
    assert counters["lorafx"]["fuse_nf4_lora.nf4_lora"] == len(lm.lora_paths()) == 7
