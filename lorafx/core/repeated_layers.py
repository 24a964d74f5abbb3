"""Trace a decoder layer once and stamp copies for the layers that repeat it.

torch.export spends ~90% of a capture (8-layer Llama) running the decoder layers on symbolic fake tensors,
so capture time grew linearly with depth (issue 21). Layers of one ModuleList that have the
same class and the same state record the same ops, with only their weights' names changed.
While exporting, the first layer of each such kind (its "representative") is traced as usual
between two marker ops, and every later layer of the kind is one placeholder op; afterwards
each placeholder is replaced by a copy of the representative's nodes reading that layer's
own weights. The result is the graph a full trace records.

What makes a copy exact, checked rather than assumed:
- same state: class, every non-tensor attribute (recursively, submodules included), parameter
  and buffer names, shapes, dtypes, devices and requires_grad; tensor attributes by value.
  The one attribute allowed to differ is `layer_idx` (Hugging Face layers keep their index
  for the KV cache); the representative traces with a probe in its place, and a trace that
  reads it (a cache update, a per-layer rule) throws the whole attempt away;
- same call: the layer receives the same argument structure, the same plain values and
  tensors with the same symbolic shapes, strides, dtypes, devices and requires_grad as its
  representative; otherwise it is traced in full. A representative called with an object
  among its arguments (a KV cache, which layers index by layer_idx) is traced as usual, and
  so is every layer of its kind;
- the representative's nodes mutate nothing and reach no tensor other than its inputs and
  weights (else the attempt is thrown away and the model exported in full).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import operator

import torch
from torch.utils import _pytree as pytree

# The attribute a layer may hold a different value of: Hugging Face's index into the KV cache.
INDEX = "layer_idx"
_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)


class StampRefused(Exception):
    """Stamping cannot give the exact graph for this model: export it in full."""


# -- the three ops the trace records (never run: the capture replaces them) ------------------
@torch.library.custom_op("lorafx::layer_inputs", mutates_args=())
def _layer_inputs(tensors: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


@torch.library.custom_op("lorafx::layer_outputs", mutates_args=())
def _layer_outputs(tensors: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


@torch.library.custom_op("lorafx::stamped_layer", mutates_args=())
def _stamped_layer(tensors: list[torch.Tensor], layer: int, call: int) -> list[torch.Tensor]:
    raise RuntimeError("lorafx::stamped_layer is a capture placeholder; it never runs")


def _like(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


@_layer_inputs.register_fake
def _(tensors, layer):
    return [_like(t) for t in tensors]


@_layer_outputs.register_fake
def _(tensors, layer):
    return [_like(t) for t in tensors]


@_stamped_layer.register_fake
def _(tensors, layer, call):
    return [_like(t) for t in _ACTIVE[-1].outputs_of[layer]]


_ACTIVE: list["_Plan"] = []  # the plan of the capture in progress (the fake above reads it)


# -- which layers repeat which ---------------------------------------------------------------
def _value_key(value, seen=()):
    """A comparable stand-in for an attribute value: simple values as they are, containers
    element by element, tensors by value, modules kept outside `_modules` (the per-layer
    function modules of the `kernels` hub) by their state, anything else by identity (two
    layers share it)."""
    if isinstance(value, _SIMPLE):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_value_key(v, seen) for v in value))
    if isinstance(value, (set, frozenset)):
        return (type(value), tuple(sorted((_value_key(v, seen) for v in value), key=repr)))
    if isinstance(value, dict):
        return (type(value), tuple((k, _value_key(v, seen)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", _tensor_key(value), value.detach().cpu().numpy().tobytes() if not value.is_meta else None)
    if isinstance(value, torch.nn.Module) and id(value) not in seen:
        return ("module", layer_state(value, seen))
    if hasattr(value, "to_json_string") and hasattr(value, "to_dict"):  # a transformers (generation) config
        return ("config", type(value), tuple(sorted((k, repr(v)) for k, v in vars(value).items())))
    return ("id", id(value))


def _tensor_key(t: torch.Tensor):
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


SKIP = {"_parameters", "_buffers", "_modules", INDEX}


def layer_state(layer: torch.nn.Module, seen=(), skip=SKIP):
    """Everything about `layer` its trace can depend on, except its weights' values (and the
    attributes in `skip`)."""
    state = []
    seen = (*seen, *(id(m) for m in layer.modules()))
    for path, module in layer.named_modules(remove_duplicate=False):
        attrs = tuple((k, _value_key(v, seen)) for k, v in sorted(module.__dict__.items()) if k not in skip)
        tensors = tuple(
            (kind, name, None if t is None else _tensor_key(t))
            for kind, table in (("p", module._parameters), ("b", module._buffers))
            for name, t in table.items()
        )
        state.append((path, type(module), attrs, tensors))
    return tuple(state)


def repeated_layers(model: torch.nn.Module) -> dict[str, str]:
    """Layer path → the path of the earlier layer of the same ModuleList it repeats."""
    repeats: dict[str, str] = {}
    layers: list[str] = []  # every layer of the lists taken: lists inside them stay (one level of stamping)
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(f"{outer}.") for outer in layers):
            continue
        firsts: dict[object, str] = {}
        for name, layer in module.named_children():
            key = layer_state(layer)
            child = f"{path}.{name}" if path else name
            layers.append(child)
            if key in firsts:
                repeats[child] = firsts[key]
            else:
                firsts[key] = child
    return repeats


# -- the trace ------------------------------------------------------------------------------
class _Probe:
    """Stands in for a representative's `layer_idx` while it is traced: any use of the value
    means the layers' graphs may differ by index, so stamping is refused."""

    def __init__(self, plan, value):
        self._plan, self._value = plan, value

    def _touched(self, *args):
        self._plan.index_read = True
        raise StampRefused("a repeated layer's trace reads its layer_idx")

    __index__ = __int__ = __float__ = __bool__ = __hash__ = __eq__ = __ne__ = __lt__ = __le__ = _touched
    __gt__ = __ge__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __str__ = _touched
    __repr__ = __format__ = __truediv__ = __floordiv__ = __mod__ = _touched


@dataclasses.dataclass
class _Call:
    """What a representative was called with, to compare the repeats' calls against."""

    spec: object  # pytree spec of (args, kwargs)
    leaves: list  # the flattened arguments themselves: compared when the repeats are called
    out_spec: object = None
    out_leaves: list | None = None  # tensors' positions hold None


@dataclasses.dataclass
class _Plan:
    repeats: dict[str, str]  # layer path → representative path
    calls: dict[str, _Call] = dataclasses.field(default_factory=dict)
    outputs_of: dict[int, list] = dataclasses.field(default_factory=dict)  # representative id → output fakes
    ids: dict[str, int] = dataclasses.field(default_factory=dict)  # representative path → id
    stamps: list[str] = dataclasses.field(default_factory=list)  # path of each placeholder's layer
    index_read: bool = False
    probed: dict[str, list] = dataclasses.field(default_factory=dict)  # representative → (module, its real layer_idx)


def _sym_key(x):
    """Symbolic sizes compared by expression: comparing SymInts with == would add guards. Taken
    when compared: `expr` applies what the trace has learnt since (s70 = s53)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = x.node.expr
        if expr.is_number:  # specialized by the trace: the plain value it now is
            return {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(x)](expr)
        return ("sym", expr)
    return x


def _call_leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(_sym_key(s) for s in x.shape), tuple(_sym_key(s) for s in x.stride()),
                x.dtype, x.device, x.requires_grad)
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        key = _sym_key(x)
        return key if isinstance(key, tuple) else (type(key), key)
    if isinstance(x, _SIMPLE):
        return (type(x), x)
    return ("id", id(x))


def _split(args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    return leaves, spec, tensors


def _rebuild(leaves, spec, tensors):
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _representative_forward(plan: _Plan, path: str, forward):
    def run(*args, **kwargs):
        if path in plan.calls:
            raise StampRefused(f"{path} is called more than once")
        leaves, spec, tensors = _split(args, kwargs)
        if not all(isinstance(x, (torch.Tensor, *_SIMPLE, torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves):
            # an object among the arguments (a KV cache, which layers index by layer_idx): no
            # call to compare the repeats' against, so every layer of this kind is traced
            for sub, value in plan.probed.pop(path):
                sub.__dict__[INDEX] = value
            return forward(*args, **kwargs)
        if len({id(t) for t in tensors}) != len(tensors):
            raise StampRefused(f"{path} gets one tensor twice")
        layer = plan.ids.setdefault(path, len(plan.ids))
        call = plan.calls[path] = _Call(spec, leaves)
        args, kwargs = _rebuild(leaves, spec, torch.ops.lorafx.layer_inputs(tensors, layer))
        out = forward(*args, **kwargs)
        out_leaves, call.out_spec = pytree.tree_flatten(out)
        if not all(isinstance(x, torch.Tensor) or isinstance(x, _SIMPLE) for x in out_leaves):
            raise StampRefused(f"{path} returns a {type(out).__name__} holding non-tensor objects")
        outs = [x for x in out_leaves if isinstance(x, torch.Tensor)]
        call.out_leaves = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
        marked = torch.ops.lorafx.layer_outputs(outs, layer)
        plan.outputs_of[layer] = marked
        return _rebuild(out_leaves, call.out_spec, marked)

    return run


def _repeat_forward(plan: _Plan, path: str, forward):
    rep = plan.repeats[path]

    def run(*args, **kwargs):
        leaves, spec, tensors = _split(args, kwargs)
        call = plan.calls.get(rep)
        same = (
            call is not None and call.out_leaves is not None and spec == call.spec
            and [_call_leaf_key(x) for x in leaves] == [_call_leaf_key(x) for x in call.leaves]
            and len({id(t) for t in tensors}) == len(tensors)
        )
        if not same:  # called otherwise than its representative: trace it for real
            return forward(*args, **kwargs)
        if path in plan.stamps:
            raise StampRefused(f"{path} is called more than once")
        plan.stamps.append(path)
        outs = iter(torch.ops.lorafx.stamped_layer(tensors, plan.ids[rep], len(plan.stamps) - 1))
        return pytree.tree_unflatten([next(outs) if x is None else x for x in call.out_leaves], call.out_spec)

    return run


@contextlib.contextmanager
def stamping(model: torch.nn.Module, repeats: dict[str, str]):
    """Within: representatives' forwards are marked, repeats' forwards are placeholders.
    Yields the plan that `expand` needs."""
    plan = _Plan(repeats)
    modules = dict(model.named_modules())
    patched = []
    for path in set(repeats.values()):
        patched.append((modules[path], _representative_forward(plan, path, modules[path].forward)))
        plan.probed[path] = []
        for sub in modules[path].modules():
            if INDEX in sub.__dict__:
                plan.probed[path].append((sub, sub.__dict__[INDEX]))
                sub.__dict__[INDEX] = _Probe(plan, sub.__dict__[INDEX])
    for path in repeats:
        patched.append((modules[path], _repeat_forward(plan, path, modules[path].forward)))
    had = [(m, m.__dict__.get("forward")) for m, _ in patched]
    for module, forward in patched:
        module.forward = forward
    _ACTIVE.append(plan)
    try:
        yield plan
    finally:
        _ACTIVE.pop()
        for module, old in had:
            if old is None:
                del module.__dict__["forward"]
            else:
                module.forward = old
        for sub, value in itertools.chain.from_iterable(plan.probed.values()):
            sub.__dict__[INDEX] = value


# -- after the trace: placeholders → copies -------------------------------------------------
def _getitems(node):
    """node's outputs by index: the getitem nodes reading its list result."""
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def expand(gm: torch.fx.GraphModule, plan: _Plan, model: torch.nn.Module) -> int:
    """Replace every lorafx::stamped_layer node of `gm` with a copy of its representative's
    nodes over that layer's weights, and drop the markers. Returns the number of layers stamped."""
    if plan.index_read:
        raise StampRefused("a repeated layer's trace reads its layer_idx")
    graph = gm.graph
    ops = torch.ops.lorafx
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    ins = {n.args[1]: n for n in nodes if n.target is ops.layer_inputs.default}
    outs = {n.args[1]: n for n in nodes if n.target is ops.layer_outputs.default}
    paths = {i: p for p, i in plan.ids.items()}
    bodies = {}
    for layer, begin in ins.items():
        end = outs[layer]
        inputs = _getitems(begin)
        body = [n for n in nodes[position[begin] + 1:position[end]] if n not in inputs.values()]
        for n in body:
            if n.op != "call_function":
                raise StampRefused(f"{paths[layer]} traced to a {n.op} node")
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                raise StampRefused(f"{paths[layer]} mutates ({n.target})")
        members = set(body) | set(inputs.values())
        for n in body:
            for a in n.all_input_nodes:
                if a in members or a.op == "get_attr" and a.target.startswith(paths[layer] + "."):
                    continue
                # symbolic sizes are the same values for every layer (their symbols are global)
                if a.op != "call_function" or not isinstance(a.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                    raise StampRefused(f"{paths[layer]} reads {a.name} besides its inputs, weights and sizes")
        bodies[layer] = (begin, inputs, body, end)
    weights = {n.target: n for n in nodes if n.op == "get_attr"}  # ep.module() reads every weight, used or not
    stamped = 0
    for node in [n for n in nodes if n.target is ops.stamped_layer.default]:
        layer = node.args[1]
        begin, inputs, body, end = bodies[layer]
        rep, target = paths[layer], plan.stamps[node.args[2]]
        env = {inputs[i]: a for i, a in enumerate(node.args[0]) if i in inputs}
        attrs = {}
        with graph.inserting_before(node):
            for n in body:
                for a in n.all_input_nodes:
                    if a.op == "get_attr" and a not in attrs and a.target.startswith(rep + "."):
                        name = target + a.target[len(rep):]
                        if name not in weights:
                            weights[name] = graph.get_attr(name)
                            weights[name].meta = dict(a.meta)
                        attrs[a] = weights[name]
                env.update(attrs)
                copy = graph.node_copy(n, lambda a: env.get(a, a))
                copy.meta = _renamed_meta(n.meta, rep, target)
                env[n] = copy
        results = end.args[0]
        for i, item in _getitems(node).items():
            item.replace_all_uses_with(env.get(results[i], results[i]))
            graph.erase_node(item)
        graph.erase_node(node)
        stamped += 1
    for layer, (begin, inputs, body, end) in bodies.items():
        for i, item in _getitems(end).items():
            item.replace_all_uses_with(end.args[0][i])
            graph.erase_node(item)
        graph.erase_node(end)
        for i, item in inputs.items():
            item.replace_all_uses_with(begin.args[0][i])
            graph.erase_node(item)
        graph.erase_node(begin)
    _register_missing_weights(gm, model, plan)
    graph.lint()  # no recompile: capture builds its GraphModule over this graph next
    return stamped


def _renamed_meta(meta, rep, target):
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        meta["nn_module_stack"] = {
            _rename(k, rep, target): (_rename(path, rep, target), kind) for k, (path, kind) in stack.items()
        }
    return meta


def _rename(text, rep, target):
    """`rep` → `target` where `text` names the representative or one of its submodules."""
    for prefix in ("", "L__self__"):  # a stack entry's path, and its key
        head = prefix + rep
        if text == head or text.startswith(head + "."):
            return prefix + target + text[len(head):]
    return text


def _register_missing_weights(gm, model, plan):
    """The graph module holds the weights its graph read; the stamped layers' own weights join
    them now, as the very tensors of `model`, registered as torch.fx registers attributes."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and any(node.target.startswith(p + ".") for p in plan.repeats):
            owner, _, leaf = node.target.rpartition(".")
            holder = ensure_module(gm, owner)
            if not hasattr(holder, leaf):
                assign(holder, leaf, model.get_submodule(owner).__getattr__(leaf))


def ensure_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """root's submodule `path`, made of empty modules where it is missing."""
    module = root
    for part in path.split(".") if path else []:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    return module


def assign(module: torch.nn.Module, name: str, value) -> None:
    """As torch.fx's GraphModule stores an attribute: a tensor that is not a Parameter is a buffer."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        module.register_buffer(name, value)
    else:
        setattr(module, name, value)
