"""The output head as its own graph, so a causal-LM loss can run it a few tokens at a time.

A training call with labels needs the loss, not the logits: (batch · seq) × vocab floats
(1 GiB at 2048 × 128256, the same again for their gradient). `find_loss_head` finds the part
of the graph that produces the logits row by row — the lm_head linear, a LoRA branch on it
(lora_B and the add; the dropout and lora_A stay outside: they are hidden-sized), DoRA's
rescaling, Gemma's soft-capping (div, tanh, mul by scalars), a final scale — and
`split_at_loss_head` cuts the graph there into

    body(**inputs) -> (row_inputs, whole_inputs, output leaves with logits None)
    head(*row_chunks, *whole_inputs) -> logits of those rows

`row_inputs` are per-token tensors (batch, seq, features) cut into rows; `whole_inputs` are
the parameter-side tensors the head reads (lm_head.weight, lora_B.weight, DoRA's factor),
computed once by the body and passed whole, so autograd reaches them through the head.
lorafx.kernels.linear_cross_entropy runs the head and the cross-entropy chunk by chunk.
Nothing here rewrites the training graph: the model still returns logits when asked.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.utils._pytree as pytree

from .common import LINEAR, PassResult, aten

# Ops that act on each token's row alone, so running them on a chunk of rows gives those rows
# of the full result. Anything else between the head linear and the logits keeps the loss unfused.
ROW_WISE = {aten.linear.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
            aten.tanh.default, aten.neg.default, aten.to.dtype}
IGNORED_USERS = {aten._assert_tensor_metadata.default}  # export's dtype checks: dropped with the head


@dataclasses.dataclass
class LossHead:
    """Where the head begins, in `gm`'s graph (valid until the graph changes)."""

    logits: int  # index of the logits among the output leaves
    nodes: list[torch.fx.Node]  # the head, in graph order, the logits last
    row_inputs: list[torch.fx.Node]  # per-token tensors the head reads
    whole_inputs: list[torch.fx.Node]  # parameter-side tensors the head reads
    broadcast: list[int]  # indices into whole_inputs that elementwise ops broadcast over rows
    vocab: int
    path: str  # the head linear's module path


def find_loss_head(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Report the output head `split_at_loss_head` would cut off (nothing is rewritten):
    counts head_nodes (0 when the logits are not produced row by row), row_inputs,
    whole_inputs. LoraModel makes the cut on a training call with labels."""
    head = loss_head(gm)
    if isinstance(head, str):
        return PassResult("find_loss_head", {"head_nodes": 0, "row_inputs": 0, "whole_inputs": 0})
    counts = {"head_nodes": len(head.nodes), "row_inputs": len(head.row_inputs), "whole_inputs": len(head.whole_inputs)}
    return PassResult("find_loss_head", counts)


def loss_head(gm: torch.fx.GraphModule) -> LossHead | str:
    """The output head of `gm`, or a sentence saying why the logits cannot be cut off."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else []
    slots = pytree.tree_unflatten(list(range(len(leaves))), out_spec) if out_spec is not None and leaves else None
    index = slots.get("logits") if hasattr(slots, "get") else None
    if not isinstance(index, int) or not isinstance(leaves[index], torch.fx.Node):
        return "the graph returns no logits"
    logits = leaves[index]
    site = _head_site(logits)
    if site is None:
        return f"no linear layer produces the logits (they come from {logits.target})"
    data = _data_dependent(gm.graph)
    sized: dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        sized[node] = _vocab_sized(gm, node, site.out_features, data, sized)
    if not sized[logits]:
        return f"the logits come from {logits.target}, which does not act on each token's row alone"
    head, stack = {logits}, [logits]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if sized[arg] and arg not in head:
                head.add(arg)
                stack.append(arg)
    rows, whole, broadcast = {}, {}, set()
    for node in head:
        for user in node.users:
            if user not in head and user.target not in IGNORED_USERS and not (user is output and node is logits):
                return f"{node.name} ({node.target}) of the output head also feeds {user.name} ({user.target})"
        for arg in node.all_input_nodes:
            if arg in head:
                continue
            if arg in data:
                rows.setdefault(arg, None)
            else:
                whole.setdefault(arg, None)
                if node.target != aten.linear.default:
                    broadcast.add(arg)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_order = lambda nodes: sorted(nodes, key=order.__getitem__)  # noqa: E731
    whole_inputs = by_order(whole)
    return LossHead(
        logits=index,
        nodes=by_order(head),
        row_inputs=by_order(rows),
        whole_inputs=whole_inputs,
        broadcast=[whole_inputs.index(n) for n in broadcast],
        vocab=site.out_features,
        path=site.path,
    )


def split_at_loss_head(gm: torch.fx.GraphModule, head: LossHead) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(body, head) graphs over `gm`'s own parameters and modules (nothing is copied): body
    returns (row_inputs, whole_inputs, the output leaves with None for the logits) as a
    plain tuple, head takes (*row_inputs, *whole_inputs) and returns the logits."""
    graph, env = torch.fx.Graph(), {}
    out = graph.graph_copy(gm.graph, env)
    info = gm.graph._codegen.pytree_info
    graph._codegen = torch.fx.graph._PyTreeCodeGen(info._replace(out_spec=None))  # the same inputs, a plain tuple out
    leaves = [None if i == head.logits else leaf for i, leaf in enumerate(out)]
    graph.output(([env[n] for n in head.row_inputs], [env[n] for n in head.whole_inputs], leaves))
    for node in reversed(head.nodes):
        for user in list(env[node].users):  # export's metadata asserts on head nodes
            graph.erase_node(user)
        graph.erase_node(env[node])
    graph.lint()
    body = torch.fx.GraphModule(gm, graph)

    head_graph, head_env = torch.fx.Graph(), {}
    for node in (*head.row_inputs, *head.whole_inputs):
        head_env[node] = head_graph.placeholder(node.name)
    for node in head.nodes:
        head_env[node] = head_graph.node_copy(node, head_env.__getitem__)
    head_graph.output(head_env[head.nodes[-1]])
    head_graph.lint()
    return body, torch.fx.GraphModule(torch.nn.Module(), head_graph)


def _head_site(logits: torch.fx.Node):
    """The LinearSite of the layer the logits come from: the nearest tagged linear up the graph
    (breadth first: a LoRA branch on the head is longer than the path to its base linear)."""
    seen, queue = set(), collections.deque([logits])
    while queue:
        node = queue.popleft()
        if LINEAR in node.meta:
            return node.meta[LINEAR]
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None


def _data_dependent(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that depend on a graph input (the rest is computed from parameters alone)."""
    data = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in data for a in node.all_input_nodes):
            data.add(node)
    return data


def _vocab_sized(gm, node, vocab, data, sized) -> bool:
    """True for a per-token op whose rows have `vocab` entries: a linear to vocab outputs whose
    weight comes from parameters, or a row-wise op on such a result."""
    if node.op != "call_function" or node.target not in ROW_WISE or node not in data:
        return False
    if node.target != aten.linear.default:
        return any(sized[a] for a in node.all_input_nodes)
    weight = node.args[1]
    if weight in data:
        return False
    if LINEAR in node.meta:
        return node.meta[LINEAR].out_features == vocab
    shape = _shape(gm, weight)
    return shape is not None and len(shape) == 2 and shape[0] == vocab


def _shape(gm, node):
    if node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        return tuple(getattr(gm.get_submodule(owner) if owner else gm, name).shape)
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None

