"""Fuse each linear layer's base product and LoRA branch into one lorafx op (and undo it)."""

from __future__ import annotations

import dataclasses

import torch

import lorafx.kernels.lora_linear  # noqa: F401  (registers lorafx::lora_linear)
import lorafx.kernels.nf4_lora_linear  # noqa: F401  (registers lorafx::nf4_lora_linear)

from .common import LINEAR, LORA, PassResult, aten

NF4_DEQUANT = torch.ops.lorafx.nf4_dequant.default
LORA_LINEAR = torch.ops.lorafx.lora_linear.default
NF4_LORA_LINEAR = torch.ops.lorafx.nf4_lora_linear.default
# How a dropout looks in a Dynamo graph (the compile backend's input): modules are inlined.
_DROPOUT_FUNCTIONS = (torch.nn.functional.dropout, aten.dropout.default)


@dataclasses.dataclass
class _Branch:
    """The nodes of one LoRA branch: add(base, mul(linear(linear(x_lora, A), B), scale))."""

    add: torch.fx.Node
    scale_node: torch.fx.Node
    up: torch.fx.Node
    down: torch.fx.Node
    x_lora: torch.fx.Node | None  # the fused op's x_lora (a real dropout), None when it reads x
    identity: torch.fx.Node | None  # an nn.Identity LoRA dropout that only the branch reads

    @property
    def scale(self) -> float:
        return self.scale_node.args[1]

    @property
    def A(self) -> torch.fx.Node:
        return self.down.args[1]

    @property
    def B(self) -> torch.fx.Node:
        return self.up.args[1]


def fuse_nf4_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Rewrite `linear(x, W, bias)` + its LoRA branch into one `lorafx::lora_linear` node, or
    `linear(x, nf4_dequant(...), bias)` (+ branch) into one `lorafx::nf4_lora_linear` node.

    Why: on CUDA the fused ops are Triton kernels that never write the 16-bit weight (NF4
    tiles are decoded inside the matmul), add the LoRA-up product and bias in the epilogue,
    and read 4-bit weights once when decoding. The ops compute exactly what the subgraph
    computes (their CPU path is that subgraph's arithmetic), so the rewrite is always exact.

    The match reads node targets and structure only, because it runs on two kinds of graph:
    transform's (LoRA nodes tagged `meta[LORA]`, weights as `get_attr`, the LoRA dropout a
    `call_module`) and the graph Dynamo hands the compile backend (no lorafx tags, weights
    as placeholders, dropout inlined as `F.dropout`). The pattern is insert_lora's branch:
    add(base, mul(linear(linear(x_lora, A), B), scale)) where x_lora is x or a dropout of x,
    every intermediate used once. Dropout decision: a real dropout (an nn.Dropout module or
    an F.dropout call) stays in the graph and feeds the fused op as `x_lora`, so it keeps
    following .train()/.eval() and draws the same mask as the unfused graph; an
    nn.Identity dropout is dropped and the op reads x. A plain NF4 linear (no LoRA) fuses
    too. Left as they are: Conv1D (addmm) layers, DoRA branches (the base output has other
    readers), NF4 weights with an odd row length, and layers whose recorded dtypes disagree;
    "skipped" counts those that carry a LoRA branch or an NF4 weight (a branch is only
    known by its tags, so in Dynamo graphs only NF4 ones count). The fused node keeps the
    base node's meta (LINEAR site, module stack) and is tagged `meta[LORA] = (path,
    "fused")` when the branch was tagged; `unfuse_nf4_lora` restores insert_lora's
    subgraph, which merge_lora reads. Run it before checkpoint_layers, which moves layers
    into bodies this pass does not enter.
    """
    counts = {"lora": 0, "nf4_lora": 0, "nf4": 0, "skipped": 0}
    graph = gm.graph
    erased: set[torch.fx.Node] = set()  # LoRA-down/up linears of fused branches are candidates too
    for base in list(graph.nodes):
        if base.op != "call_function" or base.target not in (aten.linear.default, aten.addmm.default):
            continue
        if base in erased or LORA in base.meta:
            continue
        weight = base.args[1]
        nf4 = isinstance(weight, torch.fx.Node) and weight.target == NF4_DEQUANT
        branch = _lora_branch(gm, base) if base.target == aten.linear.default else None
        if base.target == aten.addmm.default or (branch is None and not nf4):
            counts["skipped"] += _has_lora_users(base)
            continue
        if not _fusable(base, weight, nf4, branch):
            counts["skipped"] += 1
            continue
        x, bias = base.args[0], base.args[2] if len(base.args) > 2 else None
        lora_args = (branch.A, branch.B, float(branch.scale)) if branch else (None, None, 1.0)
        x_lora = branch.x_lora if branch else None
        last = branch.add if branch else base
        with graph.inserting_before(last):
            if nf4:
                fused = graph.call_function(NF4_LORA_LINEAR, (x, *weight.args[:8], *lora_args, bias, x_lora))
            else:
                fused = graph.call_function(LORA_LINEAR, (x, weight, *lora_args, bias, x_lora))
        fused.meta = {k: v for k, v in base.meta.items() if k not in ("val", "example_value")}
        for key in ("val", "example_value"):
            if key in last.meta:
                fused.meta[key] = last.meta[key]
        if branch and LORA in branch.add.meta:
            fused.meta[LORA] = (branch.add.meta[LORA][0], "fused")
        last.replace_all_uses_with(fused)
        dead = [branch.add, branch.scale_node, branch.up, branch.down, base] if branch else [base]
        if branch and branch.identity is not None:
            dead.append(branch.identity)
        if nf4:
            dead.append(weight)
        for node in dead:
            graph.erase_node(node)
        erased.update(dead)
        counts["nf4_lora" if nf4 and branch else "nf4" if nf4 else "lora"] += 1
    graph.lint()
    gm.recompile()
    return PassResult("fuse_nf4_lora", counts)


def _has_lora_users(base: torch.fx.Node) -> int:
    """1 when the layer has a tagged LoRA branch (leaving it unfused is worth counting), else 0."""
    return int(any(LORA in user.meta for user in base.users))


def _only_user(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    return list(node.users) == [user]


def _lora_branch(gm: torch.fx.GraphModule, base: torch.fx.Node) -> _Branch | None:
    """The LoRA branch added to `base`, or None unless the exact insert_lora pattern is there."""
    if len(base.users) != 1:
        return None
    add = next(iter(base.users))
    if add.target != aten.add.Tensor or len(add.args) != 2 or add.args[0] is not base or add.kwargs:
        return None
    scaled = add.args[1]
    if not (_is_call(scaled, aten.mul.Tensor, 2) and _only_user(scaled, add)):
        return None
    up, scale = scaled.args
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool)):
        return None
    if not (_is_call(up, aten.linear.default, 2) and _only_user(up, scaled)):
        return None
    down = up.args[0]
    if not (_is_call(down, aten.linear.default, 2) and _only_user(down, up)):
        return None
    x, source = base.args[0], down.args[0]
    if source is x:
        return _Branch(add, scaled, up, down, x_lora=None, identity=None)
    kind = _dropout_kind(gm, source)
    if kind is None or source.args[0] is not x:
        return None
    if kind == "identity":
        return _Branch(add, scaled, up, down, x_lora=None, identity=source if _only_user(source, down) else None)
    return _Branch(add, scaled, up, down, x_lora=source, identity=None)


def _is_call(node, target, nargs: int) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target == target
        and len(node.args) == nargs
        and not node.kwargs
    )


def _dropout_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """What feeds the LoRA branch: "dropout", "identity" (an nn.Identity LoRA dropout) or None (neither)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, torch.nn.Identity):
            return "identity"
        return "dropout" if isinstance(module, torch.nn.Dropout) else None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return "dropout"
    return None


def _dtype(node) -> torch.dtype | None:
    """The dtype a node's value has, when the graph recorded it (transform graphs often do not)."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value.dtype if isinstance(value, torch.Tensor) else None


def _fusable(base, weight, nf4: bool, branch: _Branch | None) -> bool:
    """The fused op accepts these operands: one dtype throughout, NF4 rows of whole bytes."""
    operands = [base.args[0], weight, base.args[2] if len(base.args) > 2 else None]
    if branch:
        operands += [branch.A, branch.B, branch.x_lora, branch.add]
    dtypes = {_dtype(n) for n in operands} - {None}
    if nf4:
        shape, dtype = weight.args[7], weight.args[8]
        if weight.kwargs or len(weight.users) != 1 or len(shape) != 2 or shape[1] % 2:
            return False
        dtypes.add(dtype)
    return len(dtypes) <= 1


def unfuse_nf4_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Turn every fused node back into the subgraph insert_lora (and quantize_nf4) wrote.

    For passes that read that subgraph, merge_lora first: it folds B·A into the weight by
    the branch's tagged roles. The restored nodes carry the same meta tags as the
    originals; a branch whose LoRA input was x again reads `<path>.lora_dropout` (the
    Identity module is still registered). Fused nodes without a LORA tag (plain NF4
    layers, or graphs that were never tagged) are restored without tags.
    """
    counts = {"lora": 0, "nf4_lora": 0, "nf4": 0}
    graph = gm.graph
    for fused in list(graph.nodes):
        if fused.op != "call_function" or fused.target not in (LORA_LINEAR, NF4_LORA_LINEAR):
            continue
        nf4 = fused.target == NF4_LORA_LINEAR
        x, *weight_args = fused.args[: 9 if nf4 else 2]
        A, B, scale, bias, x_lora = fused.args[9:] if nf4 else fused.args[2:]
        path = fused.meta[LORA][0] if LORA in fused.meta else None
        meta = {k: v for k, v in fused.meta.items() if k not in (LORA, "val", "example_value")}

        def add(target, args, role, op="call_function"):
            node = graph.create_node(op, target, args)
            if path is not None:
                node.meta[LORA] = (path, role)
            if "nn_module_stack" in meta:
                node.meta["nn_module_stack"] = meta["nn_module_stack"]
            return node

        with graph.inserting_before(fused):
            if nf4:
                weight = graph.call_function(NF4_DEQUANT, (*weight_args, _compute_dtype(fused)))
            else:
                (weight,) = weight_args
            base = graph.call_function(aten.linear.default, (x, weight, bias) if bias is not None else (x, weight))
            base.meta = meta
            out = base
            if A is not None:
                if x_lora is None and path is not None:
                    x_lora = add(f"{path}.lora_dropout", (x,), "dropout", op="call_module")
                down = add(aten.linear.default, (x if x_lora is None else x_lora, A), "down")
                up = add(aten.linear.default, (down, B), "up")
                out = add(aten.add.Tensor, (base, add(aten.mul.Tensor, (up, scale), "scale")), "add")
        fused.replace_all_uses_with(out)
        graph.erase_node(fused)
        counts["nf4_lora" if nf4 and A is not None else "nf4" if nf4 else "lora"] += 1
    graph.lint()
    gm.recompile()
    return PassResult("unfuse_nf4_lora", counts)


def _compute_dtype(fused: torch.fx.Node) -> torch.dtype:
    """The dtype an NF4 weight dequantizes to: the layer's compute dtype."""
    if LINEAR in fused.meta:
        return fused.meta[LINEAR].dtype
    dtype = _dtype(fused)
    if dtype is None:
        raise ValueError(f"cannot unfuse {fused.name}: neither a LINEAR site nor a recorded value gives its dtype")
    return dtype
