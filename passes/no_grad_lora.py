"""The LoRA layers of the graph that serves calls without autograd (`torch.no_grad()`, inference).

insert_lora's branch is PEFT's arithmetic: linear(x, A), linear(·, B), mul(scale), add(y, ·).
On CPU it costs ~20-35% of the merged model's time for ~3% more FLOPs, and most of that is not
the FLOPs: three fresh (tokens × out_features) tensors (the up product, its scaled copy, the
sum), each written and read once more, and the up product's GEMM (K = r) reading Bᵀ as a
transposed view. Without a backward to feed, a layer can do better, exactly or nearly:

- folded: y = x·W'ᵀ (+ b) with W' = W + scale·B·A, the merged model's cost. W' is computed once
  and kept while W, A and B are the same tensors at the same version (`tensor._version` counts
  in-place writes: optimizer steps, load_adapter's copy_, any `p.mul_()`), so a training step or
  a new adapter is seen by the next call. The rounding differs from PEFT's unmerged sum by
  about 1e-6 relative at the logits (float32; bench/bench_unmerged_forward.py prints it), so
  float32/float64 layers only, and only where the LoRA input is the layer's input (dropout off
  or in eval mode). Each W' costs the memory of W: they share a byte budget
  (`MergedWeights.limit`, set from LoraModel.merged_weights_budget) and LoraModel drops them at
  the next grad-enabled call, so training holds none; layers past the budget, and calls
  that would build a W' for fewer tokens than it pays back (tokens·(in+out) < in·out, e.g. one
  decode step), take the accumulated path.
- accumulated: y2 = (x·Wᵀ).flatten(0, -2);  y2.addmm_(x_lora2·Aᵀ, contiguous(Bᵀ), alpha=scale)
  adds the branch into the base output inside the GEMM (beta=1): only the (tokens × r) down
  product is allocated. addmm scales inside the GEMM, so the rounding differs from PEFT's
  mul-then-add by an ulp of the LoRA term. NF4 bases (their W is dequantized per call) take
  this path.

Not part of TRANSFORM_PASSES: LoraModel runs it on a copy of its graph that shares every
tensor (LoraModel._no_grad_graph), for eager calls; grad-enabled calls keep insert_lora's graph
and PEFT's gradients. DoRA branches and 16-bit layers are left as they are: there an ulp of
the output is ~1e-3 relative, so a rounding other than PEFT's mul-then-add would be a visible
third answer (and float32 LoRA on a 16-bit layer sums in float32, then casts, as PEFT does). Writes through `p.data` bypass the version counter
(PyTorch's own caveat for `.data`); write the parameter itself (`with torch.no_grad(): p.copy_`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import LINEAR, LORA, PassResult, aten

MODULE = "lora_no_grad"  # the NoGradLoraLinear of "model.layers.0.mlp.up_proj" is "...up_proj.lora_no_grad"


class MergedWeights(torch.nn.Module):
    """The byte budget the folded weights W' of one graph share (None: no limit). Holds no tensor:
    each NoGradLoraLinear keeps its own W' and reserves its bytes here."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit
        self.used = 0
        self.__dict__["layers"] = []  # the NoGradLoraLinears that reserve here (not submodules)

    def reserve(self, nbytes: int) -> bool:
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self) -> None:
        """Drop every W' (the next no-grad calls fold again)."""
        for layer in self.layers:
            layer.merged, layer.key = None, None
        self.used = 0


class NoGradLoraLinear(torch.nn.Module):
    """One LoRA layer without autograd: folded while its W' is valid, accumulated otherwise."""

    def __init__(self, scale: float, conv1d: bool, foldable: bool, budget: MergedWeights):
        super().__init__()
        self.scale, self.conv1d, self.foldable = scale, conv1d, foldable
        self.__dict__["budget"] = budget  # shared by every layer of the graph: not a submodule
        budget.layers.append(self)
        self.merged: torch.Tensor | None = None
        self.key: tuple | None = None  # W, A, B with their data pointers and versions when W' was made
        self.folds = 0  # how many times W' was computed (tests read it)

    def forward(self, x, x_lora, weight, A, B, bias):
        if self.foldable and x_lora is x:  # Dropout in eval mode and Identity return their input
            merged = self._merged(weight, A, B, x.numel() // x.shape[-1])
            if merged is not None:
                return self._base(x, merged, bias)
        y = self._base(x, weight, bias)
        summed = y.flatten(0, -2).addmm_(x_lora.flatten(0, -2) @ A.T, B.T.contiguous(), alpha=self.scale)
        return summed.view_as(y)

    def _base(self, x, weight, bias):
        if self.conv1d:  # GPT-2's Conv1D: x is 2-D, W is stored (in, out)
            return torch.addmm(bias, x, weight) if bias is not None else x @ weight
        return F.linear(x, weight, bias)

    def _merged(self, weight, A, B, tokens):
        """W' for this call: the kept one if W, A, B are unchanged, a new one if the budget and
        the token count allow, else None."""
        key = tuple((t, t.data_ptr(), t._version) for t in (weight, A, B))
        if self.key is not None and all(k[0] is t[0] and k[1:] == t[1:] for k, t in zip(self.key, key)):
            return self.merged
        if self.merged is None:
            out_features, in_features = B.shape[0], A.shape[1]
            if tokens * (in_features + out_features) < in_features * out_features:
                return None  # the branch costs this call less than computing W'
            if not self.budget.reserve(weight.numel() * weight.element_size()):
                return None
        self.key = None  # a failure below leaves no stale W' behind
        self.merged = torch.addmm(weight, A.T, B.T, alpha=self.scale) if self.conv1d else torch.addmm(weight, B, A, alpha=self.scale)
        self.key, self.folds = key, self.folds + 1
        return self.merged


def no_grad_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Replace each plain LoRA branch and its base node by a call of the layer's NoGradLoraLinear
    (`<path>.lora_no_grad`), and give the graph a MergedWeights budget (`merged_weights`, no
    limit until the caller sets one). Counts: "branches" seen, "rewritten", "foldable" modules."""
    graph = gm.graph
    budget = MergedWeights()
    gm.add_module("merged_weights", budget)
    adds = [n for n in graph.nodes if n.meta.get(LORA, (None, None))[1] == "add"]
    rewritten, modules = 0, {}
    for add in adds:
        branch = _plain_branch(add)
        if branch is None:
            continue
        base, x_lora, a, b, scale, dead = branch
        path = add.meta[LORA][0]
        conv1d = base.target == aten.addmm.default
        bias, x, weight = base.args[:3] if conv1d else (base.args[2] if len(base.args) > 2 else None, *base.args[:2])
        if path not in modules:
            foldable = weight.op == "get_attr"  # a tensor of its own, not NF4's per-call dequant
            modules[path] = NoGradLoraLinear(scale, conv1d, foldable, budget)
            gm.get_submodule(path).add_module(MODULE, modules[path])
        with graph.inserting_before(add):
            out = graph.call_module(f"{path}.{MODULE}", (x, x_lora, weight, a, b, bias))
        out.meta.update({k: add.meta[k] for k in (LORA, "nn_module_stack", "val") if k in add.meta})
        add.replace_all_uses_with(out)
        for node in [add, *dead, base]:  # add, scale, up, down, the base: each now unused, in that order
            graph.erase_node(node)
        rewritten += 1
    graph.lint()
    gm.recompile()
    foldable = sum(m.foldable for m in modules.values())
    return PassResult("no_grad_lora", {"branches": len(adds), "rewritten": rewritten, "foldable": foldable})


def _plain_branch(add: torch.fx.Node):
    """(base, x_lora, A, B, scale, branch nodes to erase) if `add` ends a plain LoRA branch whose
    base output only this branch reads, else None."""
    base, scaled = add.args
    role = lambda node: node.meta.get(LORA, (None, None))[1] if isinstance(node, torch.fx.Node) else None  # noqa: E731
    if role(scaled) != "scale" or base.target not in (aten.linear.default, aten.addmm.default):
        return None  # DoRA ends its branch in its own term
    up, scale = scaled.args
    if role(up) != "up" or role(up.args[0]) != "down" or not isinstance(scale, (int, float)):
        return None
    down = up.args[0]
    x_lora, a = down.args
    b = up.args[1]
    if role(x_lora) != "dropout" or role(x_lora.args[0]) == "cast_in" or any(role(u) == "cast_out" for u in add.users):
        return None  # float32 LoRA on a 16-bit layer: PEFT sums in float32, keep its casts
    if base.target == aten.addmm.default and (base.kwargs or len(base.args) != 3):
        return None  # Conv1D's addmm is addmm(bias, x, W), nothing else
    if base.meta[LINEAR].dtype not in (torch.float32, torch.float64):
        return None  # 16-bit: see the module docstring
    if role(a) != "A" or role(b) != "B" or set(base.users) != {add} or base.kwargs:
        return None
    if any(len(n.users) != 1 for n in (scaled, up, down)):
        return None
    return base, x_lora, a, b, scale, (scaled, up, down)
