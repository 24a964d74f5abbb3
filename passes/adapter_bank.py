"""Several LoRA adapters in one graph, chosen per batch row (multi-adapter serving).

A bank graph has, at every linear layer some adapter adapts, one node
`lorafx::multi_lora(x, A, B, scales, ids)` added to the base output. It reads the layer's
LoraBank — every adapter's A (n, r, in) and B (n, out, r) stacked, ranks zero-padded, and one
scale per adapter — and the graph-level buffer `lora_adapter_ids`: the adapter slot of each
batch row, -1 for none. Choosing adapters is writing that buffer, and adding or removing
one re-stacks the banks: neither re-captures the model nor changes the graph's code.

The passes here are the graph surgery; lorafx/core/named_adapters.py keeps the names and configs.
"""

from __future__ import annotations

import types

import torch

from .checkpoint_layers import inline_checkpointed_layers
from .common import BRANCH_ENDS, LINEAR, LORA, PassResult, aten, input_node, remove_tagged
from .fuse_nf4_lora import unfuse_nf4_lora
from .insert_lora import _insert_branch
from .merge_lora import LORA_MODULES as MERGED_MODULES

BANK = "lorafx.bank"  # node.meta on the nodes add_banks inserts: (module path, role)
BANK_MODULE = "lora_bank"  # the LoraBank of "model.layers.0.self_attn.q_proj" is "<path>.lora_bank"
IDS = "lora_adapter_ids"  # graph_module buffer: adapter slot per batch row, -1 = base model
LORA_MODULES = (*MERGED_MODULES, BANK_MODULE)  # what strip_lora removes from a layer


class LoraBank(torch.nn.Module):
    """The adapters of one linear layer, stacked: slot i is A[i, :r_i], B[i, :, :r_i], scales[i].

    A slot of an adapter that does not adapt this layer is zero. The buffers are not
    persistent (state_dict stays the base model's: adapters are saved with save_adapter) and
    not trainable: a bank serves adapters, training happens on a single-adapter LoraModel.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("A", torch.zeros(0, 1, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(0, out_features, 1, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scales", torch.zeros(0, dtype=torch.float32, device=device), persistent=False)

    def append(self, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: float) -> None:
        """Add a slot; None (this adapter skips the layer) adds zeros."""
        n, r, _ = self.A.shape
        new_r = max(r, 0 if lora_a is None else lora_a.shape[0])
        A = self.A.new_zeros(n + 1, new_r, self.A.shape[2])
        B = self.B.new_zeros(n + 1, self.B.shape[1], new_r)
        A[:n, :r], B[:n, :, :r] = self.A, self.B
        if lora_a is not None:
            A[n, : lora_a.shape[0]] = lora_a
            B[n, :, : lora_a.shape[0]] = lora_b
        self.A, self.B = A, B
        self.scales = torch.cat([self.scales, self.scales.new_tensor([scale if lora_a is not None else 0.0])])

    def remove(self, slot: int) -> None:
        keep = [i for i in range(self.A.shape[0]) if i != slot]
        self.A, self.B, self.scales = self.A[keep], self.B[keep], self.scales[keep]

    def slot(self, slot: int, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of a slot cut to rank r, or None where the adapter skips this layer."""
        if not bool(self.scales[slot]):
            return None
        return self.A[slot, :r], self.B[slot, :, :r]


def strip_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Remove every LoRA branch and bank node, without folding anything into the weights:
    the base model's graph. Checkpointed layers are inlined and fused ops unfused first."""
    inline_checkpointed_layers(gm)
    unfuse_nf4_lora(gm)
    counts = remove_tagged(gm, (LORA, BANK), BRANCH_ENDS, LORA_MODULES)
    if IDS in gm._buffers:
        del gm._buffers[IDS]
    return PassResult("strip_lora", {"modules": counts["modules"], "nodes_removed": counts["nodes_removed"]})


def add_banks(gm: torch.fx.GraphModule, paths) -> PassResult:
    """Give each linear layer in `paths` that has none a LoraBank (empty: call `append` for
    every adapter already in the other banks) and a multi_lora node after each of its calls."""
    import lorafx.kernels.multi_lora  # noqa: F401  registers torch.ops.lorafx.multi_lora

    if IDS not in gm._buffers:
        device = next((t.device for t in gm.buffers()), None) or next(gm.parameters()).device
        gm.register_buffer(IDS, torch.full((1,), -1, dtype=torch.long, device=device), persistent=False)
    graph, added = gm.graph, []
    for node in list(graph.nodes):
        site = node.meta.get(LINEAR)
        if site is None or site.path not in paths or any(BANK in u.meta for u in node.users):
            continue
        owner = gm.get_submodule(site.path)
        if not hasattr(owner, BANK_MODULE):
            owner.add_module(BANK_MODULE, LoraBank(site.in_features, site.out_features, site.dtype, site.device))
            added.append(site.path)
        users = list(node.users)

        def add(op, target, args, role):
            new = graph.create_node(op, target, args)
            new.meta[BANK] = (site.path, role)
            if "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            return new

        with graph.inserting_before(node.next):
            bank = [add("get_attr", f"{site.path}.{BANK_MODULE}.{name}", (), name) for name in ("A", "B", "scales")]
            ids = add("get_attr", IDS, (), "ids")
            delta = add("call_function", torch.ops.lorafx.multi_lora.default, (input_node(node), *bank, ids), "multi_lora")
            out = add("call_function", aten.add.Tensor, (node, delta), "add")
        for user in users:
            user.replace_input_with(node, out)
    graph.lint()
    gm.recompile()
    return PassResult("add_banks", {"banks": len(added)})


def unbank(gm: torch.fx.GraphModule, slot: int, r: int, scale: float) -> PassResult:
    """Turn the bank graph into insert_lora's single-adapter graph for adapter `slot` (rank r):
    what merge_lora reads. Layers the adapter skips get no branch."""
    weights = {path: bank.slot(slot, r) for path, bank in banks(gm)}
    strip_lora(gm)
    like_spec = types.SimpleNamespace(scale=scale, use_dora=False, dropout=0.0)
    branches = 0
    for node in list(gm.graph.nodes):
        site = node.meta.get(LINEAR)
        if site is None or weights.get(site.path) is None:
            continue
        owner = gm.get_submodule(site.path)
        if not hasattr(owner, "lora_A"):
            lora_a, lora_b = weights[site.path]
            owner.add_module("lora_A", _frozen_linear(lora_a))
            owner.add_module("lora_B", _frozen_linear(lora_b))
            owner.add_module("lora_dropout", torch.nn.Identity())
        _insert_branch(gm, node, site, like_spec)
        branches += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult("unbank", {"branches": branches})


def _frozen_linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return linear


def banks(gm) -> list[tuple[str, LoraBank]]:
    """(module path, LoraBank) of every banked layer."""
    return [(name.rsplit(".", 1)[0], m) for name, m in gm.named_modules() if isinstance(m, LoraBank)]


def inline_multi_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Off CUDA, under torch.compile: each lorafx::multi_lora call becomes the op's gathered-bank
    aten ops (kernels/multi_lora.py multi_lora_gathered), which Inductor fuses with the layer
    around it; the op itself is an opaque Python call per layer. Adapter ids are checked where
    they are written (named_adapters.write_ids, the serving engine), not in the graph."""
    from lorafx.kernels.multi_lora import multi_lora_gathered

    ops = {torch.ops.lorafx.multi_lora.default, torch.ops.lorafx.multi_lora} if hasattr(torch.ops.lorafx, "multi_lora") else set()
    inlined = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops:
            node.target = multi_lora_gathered
            inlined += 1
    if inlined:
        gm.recompile()
    return PassResult("inline_multi_lora", {"inlined": inlined})

