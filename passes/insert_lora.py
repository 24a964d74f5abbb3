from __future__ import annotations

import importlib
import math

import torch

from .common import LINEAR, LORA, PassResult, aten, input_node, weight_node, weight_value
from .init_lora import LORA_INIT


class NoTargetError(ValueError):
    """The spec's targets select no linear layer of the model, or a module lorafx cannot adapt."""


# Module types PEFT puts LoRA on that lorafx does not: a target naming one must not be a silent
# no-op (PEFT's adapter would differ). A Linear here is one whose op reads another module's
# weight (a head tied to the embedding), so match_linears left it out.
PEFT_ONLY = {
    torch.nn.Embedding: "an embedding (PEFT adapts it with lora_embedding_A/B)",
    torch.nn.Conv1d: "a convolution (PEFT's conv LoRA)",
    torch.nn.Conv2d: "a convolution (PEFT's conv LoRA)",
    torch.nn.Conv3d: "a convolution (PEFT's conv LoRA)",
    torch.nn.MultiheadAttention: "nn.MultiheadAttention (PEFT adapts its in/out projections)",
    torch.nn.Linear: "a linear layer whose op does not read its own weight (e.g. an output head tied to the embedding)",
}


def insert_lora(gm: torch.fx.GraphModule, spec) -> PassResult:
    """Add h = W0·x + scale·B·A·dropout(x) to every linear layer `spec` selects.

    For each selected LinearSite the pass registers PEFT-named submodules under the layer's
    path (`<path>.lora_A`, `<path>.lora_B`, `<path>.lora_dropout`) and inserts, after the
    base node y:  x → dropout → linear(·, A) → linear(·, B) → mul(scale) → add(y, ·).
    The same subgraph serves Conv1D (addmm): its x is already the 2-D view addmm reads.
    With `spec.use_dora`, DoRA's magnitude vector `<path>.lora_magnitude_vector` and its
    rescaling term join the branch (see `_dora`).
    Base weights are frozen. Every inserted node is tagged `meta[LORA] = (path, role)` so
    merge_lora and the fuse passes find the subgraph without pattern guessing.
    """
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    selected = [n for n in sites if spec.selects(n.meta[LINEAR].path)]
    if spec.targets != "all-linear":  # which means linear layers; named targets must all be adapted
        _refuse_unadaptable(gm, spec, {n.meta[LINEAR].path for n in sites})
    if not selected:
        names = sorted({n.meta[LINEAR].path for n in sites})
        raise NoTargetError(
            f"LoraSpec.targets={spec.targets!r} (exclude={spec.exclude!r}) matches no linear layer. "
            f"Linear layers in this model: {', '.join(names) if names else 'none'}"
        )
    saved = _unfreeze_modules_to_save(gm, spec)
    modules = set()
    for node in selected:
        site = node.meta[LINEAR]
        if site.path not in modules:
            _add_lora_modules(gm, node, site, spec)
            modules.add(site.path)
        _insert_branch(gm, node, site, spec)
    gm.graph.lint()
    gm.recompile()
    counts = {"linear": len(sites), "lora": len(selected), "modules": len(modules), "saved": saved}
    return PassResult("insert_lora", counts)


def _refuse_unadaptable(gm, spec, site_paths: set[str]) -> None:
    """Fail naming the first module the targets select that is of a type PEFT adapts and
    lorafx does not (PEFT_ONLY), read from the graph's nn_module_stack (path, type name)."""
    called = {}
    for node in gm.graph.nodes:
        for path, module_type in (node.meta.get("nn_module_stack") or {}).values():
            called.setdefault(path, module_type)
    for path, module_type in sorted(called.items()):
        if path in site_paths or not spec.selects(path):
            continue
        cls = _class_named(module_type)
        kind = next((why for base, why in PEFT_ONLY.items() if isinstance(cls, type) and issubclass(cls, base)), None)
        if kind:
            raise NoTargetError(
                f"LoraSpec.targets={spec.targets!r} selects {path!r} ({getattr(cls, '__name__', cls)}), {kind}, "
                "which lorafx cannot adapt: it puts LoRA on linear layers only; leave it out of targets or add it "
                "to exclude"
            )


def _class_named(module_type):
    """The class an nn_module_stack entry names ("torch.nn.modules.sparse.Embedding"), or None."""
    if isinstance(module_type, type):
        return module_type
    module_name, _, qualname = str(module_type).rpartition(".")
    try:
        obj = importlib.import_module(module_name)
    except ImportError:  # e.g. a class defined in __main__ of another process: not one of torch's
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _unfreeze_modules_to_save(gm, spec) -> int:
    """Freeze the base; the parameters of spec.modules_to_save train in full (PEFT's
    modules_to_save). Returns how many parameters that is; a list that names no module fails."""
    saved = 0
    for name, p in gm.named_parameters():
        train = spec.saves(name.rpartition(".")[0])
        p.requires_grad_(train)
        saved += train
    if spec.modules_to_save and not saved:
        raise NoTargetError(
            f"LoraSpec.modules_to_save={spec.modules_to_save!r} matches no module with parameters; "
            "name the module(s) to train in full, e.g. ['score'], or pass modules_to_save=[]"
        )
    return saved


def adapter_dtype(site, spec) -> torch.dtype:
    """The dtype of a layer's LoRA weights: float32 on a float16/bfloat16 layer, as PEFT's
    autocast_adapter_dtype=True (updates below 16-bit resolution would vanish), else the
    layer's. DoRA layers and NF4 layers keep the compute dtype (the fused kernels and DoRA's
    norm run in it); spec.autocast_adapter_dtype=False keeps it everywhere."""
    upcast = spec.autocast_adapter_dtype and not spec.use_dora and not spec.quantizes(site.path)
    return torch.float32 if upcast and site.dtype in (torch.float16, torch.bfloat16) else site.dtype


def _add_lora_modules(gm, node, site, spec):
    """PEFT's module names and init (or the A, B init_lora computed); LoRA weights in
    adapter_dtype."""
    owner = gm.get_submodule(site.path)
    factory = {"device": site.device, "dtype": adapter_dtype(site, spec)}
    lora_a = torch.nn.Linear(site.in_features, spec.r, bias=False, **factory)
    lora_b = torch.nn.Linear(spec.r, site.out_features, bias=False, **factory)
    pending = gm.meta.get(LORA_INIT, {})
    computed = pending.pop(site.path, None)
    if not pending:
        gm.meta.pop(LORA_INIT, None)
    with torch.no_grad():
        if computed is not None:
            lora_a.weight.copy_(computed[0])
            lora_b.weight.copy_(computed[1])
        else:
            if spec.init == "gaussian":
                torch.nn.init.normal_(lora_a.weight, std=1 / spec.r)
            else:  # PEFT's default init (also LoftQ's layers that stay full precision)
                torch.nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            lora_b.weight.zero_()
    owner.add_module("lora_A", lora_a)
    owner.add_module("lora_B", lora_b)
    owner.add_module("lora_dropout", torch.nn.Dropout(spec.dropout) if spec.dropout else torch.nn.Identity())
    if spec.use_dora:  # the magnitude starts as ‖W + scale·B·A‖ per output row: the layer is unchanged
        combined = weight_value(gm, node).to(site.dtype)
        if computed is not None:
            combined = combined + (lora_b.weight @ lora_a.weight) * spec.scale
        norm = torch.linalg.vector_norm(combined, dim=1)
        owner.register_parameter("lora_magnitude_vector", torch.nn.Parameter(norm.detach()))


def _insert_branch(gm, node, site, spec):
    """The branch after `node`; with float32 LoRA on a 16-bit layer, PEFT's casts: x to float32
    before the dropout, the branch's sum back to the layer's dtype after the add (role
    "cast_out", which ends the branch)."""
    path, dtype = site.path, gm.get_submodule(site.path).lora_A.weight.dtype
    graph = gm.graph
    users = list(node.users)

    def add(op, target, args, role):
        new = graph.create_node(op, target, args)
        new.meta[LORA] = (path, role)
        # Keep module provenance so later passes and profilers attribute the branch to the layer.
        if "nn_module_stack" in node.meta:
            new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        return new

    with graph.inserting_before(node.next):  # each new node lands after the previous one
        x = input_node(node)
        if dtype != site.dtype:
            x = add("call_function", aten.to.dtype, (x, dtype), "cast_in")
        x = add("call_module", f"{path}.lora_dropout", (x,), "dropout")
        a = add("get_attr", f"{path}.lora_A.weight", (), "A")
        down = add("call_function", aten.linear.default, (x, a), "down")
        b = add("get_attr", f"{path}.lora_B.weight", (), "B")
        up = add("call_function", aten.linear.default, (down, b), "up")
        scaled = add("call_function", aten.mul.Tensor, (up, spec.scale), "scale")
        if spec.use_dora:
            scaled = _dora(add, node, x, a, b, scaled, path, spec)
        out = add("call_function", aten.add.Tensor, (node, scaled), "add")
        if dtype != site.dtype:
            out = add("call_function", aten.to.dtype, (out, site.dtype), "cast_out")
    for user in users:
        user.replace_input_with(node, out)


def _dora(add, node, x, a, b, scaled_lora, path, spec):
    """DoRA's extra term, exactly as PEFT computes it: with m = magnitude / ‖W + s·B·A‖_row
    (the norm detached, per the DoRA paper §4.3), the layer adds (m - 1)·(x·Wᵀ) + m·s·B·A·x.
    x·Wᵀ is the base output minus bias when LoRA dropout is off (PEFT's path), else it is
    recomputed on the dropped-out input, as PEFT does while training."""
    call = lambda target, *args: add("call_function", target, args, "dora")  # noqa: E731
    weight = weight_node(node)
    if node.target == aten.addmm.default:  # Conv1D: W is stored (in, out)
        weight = call(aten.t.default, weight)
    lora_weight = call(aten.detach.default, call(aten.mm.default, b, a))
    combined = call(aten.add.Tensor, weight, call(aten.mul.Tensor, lora_weight, spec.scale))
    norm = call(aten.detach.default, call(aten.linalg_vector_norm.default, combined, 2, [1]))
    magnitude = add("get_attr", f"{path}.lora_magnitude_vector", (), "magnitude")
    factor = call(aten.div.Tensor, magnitude, norm)
    if spec.dropout:
        base = call(aten.linear.default, x, weight)
    else:
        bias = node.args[0] if node.target == aten.addmm.default else (node.args[2] if len(node.args) > 2 else None)
        base = call(aten.sub.Tensor, node, bias) if bias is not None else node
    rescaled_base = call(aten.mul.Tensor, base, call(aten.sub.Tensor, factor, 1))
    return call(aten.add.Tensor, rescaled_base, call(aten.mul.Tensor, scaled_lora, factor))
