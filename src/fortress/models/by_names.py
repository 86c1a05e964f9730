"""Stage a user's network by the names of its modules, as torchvision and timm lay networks out.

``stage_by_names(net, ["layer1", "layer2", "layer3", "layer4"], "fc", ...)`` cuts a ResNet-like
network into the stages a :class:`~fortress.models.staged.StagedBackbone` needs. The forward pass is
traced with :mod:`torch.fx` (every module called as itself; only the forward passes leading to the
named modules are entered); everything the forward pass does between them goes with them: the stem
(``conv1 → bn1 → relu → maxpool``) joins the first stage, the pooling
and flattening after the last stage (``avgpool``, ``torch.flatten``) join the classifier. Each stage
is a :class:`torch.fx.GraphModule` that shares the user's modules (nothing is copied), so the staged
network computes exactly what the user's forward pass computes, in the same order.

Only the single tensor a stage returns may cross its boundary: a forward pass that carries anything
else past a named stage (a skip connection around it, an extra input) cannot be staged there and is
reported. Python control flow in the traced forward passes is fixed at trace time (the network is
traced in eval mode: a functional ``F.dropout(x, training=self.training)`` written there stays off);
modules run as themselves, so their dropout and batch norm still switch between training and
evaluation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fortress.errors import ModelFactoryError
from fortress.models.staged import StagedBackbone

__all__ = ["probe_output", "stage_by_names"]


class _KeepNamed(fx.Tracer):
    """A tracer that enters only the forward passes leading to the named modules.

    Every other module is called as itself (one ``call_module`` node), so what it does in training
    and in evaluation (batch norm, dropout, a timm layer's own branches) stays its own business; only
    the network's forward and those of the containers of named modules (``blocks`` for
    ``blocks.3``) are traced.
    """

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self.enter = {k.rsplit(".", i)[0] for k in keep for i in range(1, k.count(".") + 1)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.enter


def _trace(net: nn.Module, keep: set[str], what: str) -> fx.Graph:
    was_training = net.training
    net.eval()
    try:
        return _KeepNamed(keep).trace(net)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFactoryError(
            f"{what}: torch.fx cannot trace its forward pass ({type(exc).__name__}: {first})"
        ) from None
    finally:
        net.train(was_training)


def _call_node(graph: fx.Graph, name: str, what: str) -> fx.Node:
    calls: list[fx.Node] = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise ModelFactoryError(
            f"{what}: module {name!r} is called {len(calls)} times by the forward pass; a stage must be called once"
        )
    return calls[0]


def _check_names(net: nn.Module, names: Sequence[str], what: str) -> None:
    children = ", ".join(n for n, _ in net.named_children()) or "(none)"
    for name in names:
        try:
            net.get_submodule(name)
        except AttributeError:
            raise ModelFactoryError(f"{what} has no module {name!r} (its top-level modules: {children})") from None
    if len(set(names)) != len(names):
        raise ModelFactoryError(f"{what}: the stage and classifier names {list(names)} repeat a name")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ModelFactoryError(f"{what}: module {b!r} lies inside {a!r}; stages cannot nest")


def _segment(net: nn.Module, nodes: list[fx.Node], start: fx.Node, end: Any, class_name: str) -> fx.GraphModule:
    """A graph module running ``nodes`` on the value of ``start`` and returning ``end`` (node or structure)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":  # the boundary check makes this unreachable
                raise ModelFactoryError(f"{class_name}: value {a.name!r} crosses a stage boundary")
            env[a] = g.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        env[n] = g.node_copy(n, lookup)
    g.output(fx.map_arg(end, lookup))
    return fx.GraphModule(net, g, class_name=class_name)


def stage_by_names(
    net: nn.Module,
    stages: Sequence[str],
    classifier: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str = "custom",
    arch_params: dict[str, Any] | None = None,
    what: str | None = None,
) -> StagedBackbone:
    """Stage ``net`` at the modules named ``stages`` with the head named ``classifier`` (bring your own model).

    Stage ``k`` runs everything the forward pass does after stage ``k-1`` (the stem, for the first)
    up to and including module ``stages[k]``; the classifier runs everything after the last stage
    (pooling, flattening, module ``classifier``, anything after it). The modules are shared with
    ``net``: training the staged network trains ``net``.

    Args:
        net: the user's network, mapping ``(N, *input_shape)`` inputs to ``(N, num_classes)`` logits.
        stages: dotted module names (``"layer1"``, ``"blocks.3"``), in the order the forward pass calls them.
        classifier: dotted name of the final classification module, called after the last stage.
        input_shape: ``(C, H, W)`` of inputs in [0, 1].
        num_classes: number of classes.
        mean: normalisation mean applied before the network (``None``: none).
        std: normalisation std.
        arch: the label recorded in saved configs.
        arch_params: the keyword arguments that rebuild ``net`` (recorded in saved configs).
        what: how error messages name the network (default: its class).

    Returns:
        The staged network; its ``staging`` records the names, mean and std.

    Raises:
        ModelFactoryError: a name is not a module of ``net``, is called more or less than once or out
            of order, the forward pass cannot be traced, or a value other than a stage's output
            crosses a stage boundary (the message names the module and the value).
        ConfigError: the staged network does not map ``input_shape`` to ``num_classes`` logits.

    Example:
        >>> net = nn.Sequential()
        >>> net.add_module("a", nn.Conv2d(1, 2, 3)); net.add_module("b", nn.Flatten())
        >>> net.add_module("fc", nn.Linear(2 * 26 * 26, 10))
        >>> stage_by_names(net, ["a"], "fc", input_shape=(1, 28, 28), num_classes=10).stage_shapes
        [(2, 26, 26)]
    """
    what = what or f"network {type(net).__name__}"
    names = [str(s) for s in stages]
    if not names:
        raise ModelFactoryError(f"{what}: name at least one stage")
    _check_names(net, [*names, classifier], what)
    graph = _trace(net, {*names, classifier}, what)
    order = {n: i for i, n in enumerate(graph.nodes)}
    cuts = [_call_node(graph, name, what) for name in names]
    head = _call_node(graph, classifier, what)
    seq = [*cuts, head]
    if any(order[a] >= order[b] for a, b in itertools.pairwise(seq)):
        called = [n.target for n in sorted(seq, key=order.__getitem__)]
        raise ModelFactoryError(f"{what}: the forward pass calls {called}, not {[*names, classifier]} in that order")
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    x = inputs[0]
    for extra in inputs[1:]:
        if extra.users:
            raise ModelFactoryError(f"{what}: the forward pass uses a second input {extra.name!r}; stage one input")
    outputs = [n for n in graph.nodes if n.op == "output"]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    # every value made before a cut (the cut's own output excepted) must be used before it
    for name, cut in zip(names, cuts, strict=True):
        for n in [x, *(b for b in body if order[b] < order[cut])]:
            late = [u for u in n.users if order[u] > order[cut]]
            if late:
                raise ModelFactoryError(
                    f"{what}: the forward pass carries {n.name!r} past stage {name!r} to {late[0].name!r} "
                    "(a skip connection around it); stage at modules nothing skips"
                )
    bounds = [x, *cuts]
    parts: list[nn.Module] = []
    for k, cut in enumerate(cuts):
        nodes = [b for b in body if order[bounds[k]] < order[b] <= order[cut]]
        parts.append(_segment(net, nodes, bounds[k], cut, f"Stage{k}"))
    tail = [b for b in body if order[b] > order[cuts[-1]]]
    head_module = _segment(net, tail, cuts[-1], outputs[0].args[0], "Classifier")
    _check_unshared([*parts, head_module], what)
    backbone = StagedBackbone(
        parts,
        head_module,
        input_shape=input_shape,
        num_classes=num_classes,
        mean=mean,
        std=std,
        arch=arch,
        arch_params=arch_params,
    )
    backbone.__dict__["_source_network"] = net  # not a submodule: its tensors are the stages'
    backbone.staging = {
        "stages": names,
        "classifier": classifier,
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
    }
    return backbone


def _check_unshared(parts: Sequence[nn.Module], what: str) -> None:
    """Refuse a parameter or buffer used by two stages (it would be saved twice under two names)."""
    owner: dict[int, tuple[int, str]] = {}
    for k, part in enumerate(parts):
        tensors = [*part.named_parameters(remove_duplicate=False), *part.named_buffers(remove_duplicate=False)]
        for name, t in tensors:
            seen = owner.setdefault(id(t), (k, name))
            if seen[0] != k:
                raise ModelFactoryError(
                    f"{what}: tensor {seen[1]!r} is used by two stages ({seen[0]} and {k}); stage at other modules"
                )


def probe_output(net: nn.Module, input_shape: Sequence[int], what: str) -> tuple[int, ...]:
    """The per-sample output shape of ``net`` on one zero image (eval mode, no gradients).

    Raises:
        ModelFactoryError: the forward pass fails on such inputs or returns something other than a tensor.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *[int(d) for d in input_shape]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFactoryError(
            f"{what} does not run on inputs of shape (N, {', '.join(str(int(d)) for d in input_shape)}): {first}"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelFactoryError(f"{what} returns a {type(out).__name__}, not a tensor of logits")
    return tuple(out.shape[1:])
