"""What passes share: the result record and the node.meta keys they read and write."""

from __future__ import annotations

import dataclasses

import torch

# node.meta keys. A pass communicates with later passes only through these.
LINEAR = "lorafx.linear"  # on a linear node: a LinearSite
LORA = "lorafx.lora"  # on every node insert_lora adds: (module path, role)
# Roles that end a branch (the node whose output replaced the layer's): "add", and "cast_out"
# after it where float32 LoRA sums back into a 16-bit layer. In graph order, so each hands
# its uses to its first argument in turn and the layer's own output is what remains.
BRANCH_ENDS = ("add", "cast_out")

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """A linear layer in the graph: y = x·Wᵀ (+b), or x·W + b for GPT-2's Conv1D (fan_in_fan_out)."""

    path: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # the module is a Conv1D (PEFT writes this flag for it)
    dtype: torch.dtype  # dtype the layer computes in (the weight's, or NF4's compute dtype)
    device: torch.device


@dataclasses.dataclass
class PassResult:
    """What a pass did; tests assert these counts."""

    name: str
    counts: dict[str, int]

    def __str__(self):
        return f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.counts.items())


def weight_node(node: torch.fx.Node) -> torch.fx.Node:
    """The weight operand of a linear (aten.linear) or Conv1D (aten.addmm) node."""
    return node.args[1] if node.target == aten.linear.default else node.args[2]


def input_node(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[0] if node.target == aten.linear.default else node.args[1]


def fetch_attr(gm: torch.nn.Module, target: str):
    """The tensor or module a `get_attr` target names ("model.layers.0.mlp.up_proj.weight")."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def weight_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The base weight of linear/Conv1D node `node` as a tensor in (out, in) layout: a
    parameter read, or the `lorafx::nf4_dequant` node that feeds it evaluated."""
    weight = weight_node(node)
    if weight.op == "get_attr":
        value = fetch_attr(gm, weight.target)
    else:
        value = weight.target(*[fetch_attr(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in weight.args])
    return value.T if node.target == aten.addmm.default else value


def tied_parameters(gm: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) → its names, for parameters that more than one module owns (GPT-2's lm_head
    and input embeddings share one)."""
    names: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def write_weight(gm: torch.fx.GraphModule, base: torch.fx.Node, path: str, value: torch.Tensor, tied) -> bool:
    """Store merged weight `value` (in the layout the parameter has) as `<path>.weight`, the weight
    linear/Conv1D node `base` reads: in place, or where that weight is tied to another module's
    (`tied`, from tied_parameters) as a new parameter of the layer's alone, read by `base` only;
    every other reader keeps the original tensor under one of its other names, so a merge never
    changes the module the layer was tied to. Returns whether it untied the weight."""
    read = weight_node(base)
    weight = fetch_attr(gm, read.target)
    own = f"{path}.weight"
    with torch.no_grad():
        if id(weight) not in tied:
            weight.copy_(value.to(weight.dtype))
            return False
    other = next(name for name in tied[id(weight)] if name != own)
    gm.get_submodule(path).register_parameter(
        "weight", torch.nn.Parameter(value.detach().to(weight.dtype), requires_grad=weight.requires_grad)
    )
    with gm.graph.inserting_before(base):
        base.replace_input_with(read, gm.graph.get_attr(own))
    if read.target == own and read.users:  # export reads a tied tensor under one name for all its users
        with gm.graph.inserting_after(read):
            read.replace_all_uses_with(gm.graph.get_attr(other))
    if not read.users:
        gm.graph.erase_node(read)
    return True


def free_submodule_name(gm: torch.nn.Module, name: str) -> str:
    """`name`, or `name1`, `name2`, ... : the first that is not a submodule of `gm` yet."""
    candidate, i = name, 1
    while True:
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        candidate, i = f"{name}{i}", i + 1


def remove_tagged(gm: torch.fx.GraphModule, keys: tuple[str, ...], ends: tuple[str, ...], attributes=()) -> dict:
    """Undo an inserted subgraph without folding it: every node tagged meta[key] = (path, role)
    for a key in `keys` goes; the `ends` roles (the node whose output replaced the layer's, e.g.
    "add") hand their uses back to their first argument; each owner module loses `attributes`.
    Returns counts {"bypassed", "nodes_removed", "modules"} (the graph is recompiled)."""

    def tag(node):
        return next((node.meta[k] for k in keys if k in node.meta), None)

    bypassed, removed, owners = 0, 0, set()
    for node in list(gm.graph.nodes):
        if (t := tag(node)) is not None and t[1] in ends:
            node.replace_all_uses_with(node.args[0])
            bypassed += 1
    for node in reversed(list(gm.graph.nodes)):
        if (t := tag(node)) is not None:
            owners.add(t[0])
            gm.graph.erase_node(node)
            removed += 1
    for path in owners:
        owner = gm.get_submodule(path)
        for name in attributes:
            if hasattr(owner, name):
                delattr(owner, name)
    gm.graph.lint()
    gm.recompile()
    return {"bypassed": bypassed, "nodes_removed": removed, "modules": len(owners)}
