"""Half precision inside an ONNX graph, with the numerically delicate parts kept in fp32.

Every node that computes on float tensors is assigned fp16 or fp32; weights follow the nodes that
read them and a Cast is inserted wherever a tensor crosses between the two. Graph inputs and
outputs stay float32, so the spec and the runtimes do not change. Kept in fp32:

- the timestep path: every node whose float inputs all derive from the ``timestep`` input (the
  sinusoidal embedding and its MLPs, which lose whole steps in fp16);
- softmax;
- normalisation statistics: InstanceNormalization (GroupNorm after export), LayerNormalization,
  GroupNormalization, reductions, square roots, powers and squares (``Mul(x, x)``).

TensorRT 10+ networks are strongly typed, so what this pass writes is what the GPU runs.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
HALF = TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

KEEP_FP32_OPS = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "BatchNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "Sqrt",
        "Pow",
        "Reciprocal",
        "Exp",
        "Log",
        "Sin",
        "Cos",
        "Range",
    }
)
# Inputs that ONNX types as float32 whatever the node computes in (Resize's roi and scales).
FIXED_FLOAT_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}
TIME_INPUTS = ("timestep",)


@dataclass(frozen=True)
class HalfReport:
    fp16_nodes: int
    fp32_nodes: int
    casts: int
    clipped_weights: int  # weights whose values exceeded the fp16 range and were clipped


def convert_to_fp16(model: onnx.ModelProto) -> HalfReport:
    """Rewrite ``model`` in place to mixed precision; its weights must be loaded in memory.

    In place because a copy of the sd21-base UNet would cost another 3.5 GB.
    """
    graph = model.graph
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise NotImplementedError(
                f"node {node.name} ({node.op_type}) has a subgraph; the fp16 pass handles "
                "straight-line graphs only"
            )
    plan = _Plan(graph, _tensor_types(model))
    plan.assign()
    return plan.rewrite()


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without weight values: shape inference needs only their types and dims."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    g = sk.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        stub = g.initializer.add()
        stub.name = t.name
        stub.data_type = t.data_type
        stub.dims.extend(t.dims)
    return sk


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from shape inference on the weightless skeleton."""
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False)
    types: dict[str, int] = {}
    g = inferred.graph
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    missing = [o for node in g.node for o in node.output if o and o not in types]
    if missing:
        raise NotImplementedError(
            f"shape inference gave no type for {len(missing)} tensors (first: {missing[:3]}); "
            "the fp16 pass needs every tensor's type"
        )
    return types


class _Plan:
    def __init__(self, graph: onnx.GraphProto, types: dict[str, int]) -> None:
        self.graph = graph
        self.types = types
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {
            n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output
        }
        # Nodes are referred to by position: protobuf wrappers are not stable objects.
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for k, node in enumerate(graph.node):
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((k, i))
        self.half: list[bool] = []  # per node position: runs in fp16

    def float_inputs(self, node: onnx.NodeProto) -> list[tuple[int, str]]:
        fixed = FIXED_FLOAT_INPUTS.get(node.op_type, frozenset())
        return [
            (i, name)
            for i, name in enumerate(node.input)
            if name and i not in fixed and self.types.get(name) == FLOAT
        ]

    def float_outputs(self, node: onnx.NodeProto) -> list[str]:
        return [o for o in node.output if o and self.types.get(o) == FLOAT]

    def assign(self) -> None:
        static = {*self.initializers, *self.constant_nodes}  # values known before any input
        timed = {n for n in TIME_INPUTS if n in self.types}
        for node in self.graph.node:
            floats = [name for _, name in self.float_inputs(node)]
            dynamic = [n for n in floats if n not in static]
            if not dynamic and all(n in static for n in node.input if n):
                static.update(o for o in node.output if o)
            if dynamic and all(n in timed for n in dynamic):
                timed.update(o for o in node.output if o)
            square = (
                node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
            )
            keep = node.op_type in KEEP_FP32_OPS or square or all(n in timed for n in dynamic)
            self.half.append(bool(dynamic) and not keep)

    def rewrite(self) -> HalfReport:
        graph = self.graph
        home: dict[str, int] = {}  # precision each float tensor is produced in
        for k, node in enumerate(graph.node):
            if self.half[k]:
                home.update((o, HALF) for o in self.float_outputs(node))
                if node.op_type == "Cast":
                    for a in node.attribute:
                        if a.name == "to" and a.i == FLOAT:
                            a.i = HALF
        clipped = self._convert_constants(home)

        casts: dict[tuple[str, int], str] = {}
        new_nodes: list[onnx.NodeProto] = []

        def converted(name: str, to: int) -> str:
            key = (name, to)
            if key not in casts:
                suffix = "fp16" if to == HALF else "fp32"
                casts[key] = f"{name}__{suffix}"
                new_nodes.append(
                    helper.make_node(
                        "Cast", [name], [casts[key]], to=to, name=f"{name}__cast_{suffix}"
                    )
                )
            return casts[key]

        for k, node in enumerate(graph.node):
            want = HALF if self.half[k] else FLOAT
            inputs = self.float_inputs(node)
            if len(inputs) == 1 and not self.float_outputs(node):
                continue  # Shape, Size and the like read either precision as it is
            for i, name in inputs:
                have = home.get(name, FLOAT)
                if have == want:
                    continue
                half_copy = self._half_copies.get(name)
                node.input[i] = half_copy if want == HALF and half_copy else converted(name, want)

        for out in graph.output:
            if home.get(out.name) == HALF:
                inner = f"{out.name}__fp16"
                for node in graph.node:
                    for i, name in enumerate(node.output):
                        if name == out.name:
                            node.output[i] = inner
                    for i, name in enumerate(node.input):
                        if name == out.name:
                            node.input[i] = inner
                new_nodes.append(
                    helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"{out.name}__out")
                )
        all_nodes = [_detached(n) for n in graph.node] + new_nodes
        del graph.node[:]
        graph.node.extend(_toposort(all_nodes, graph))
        del graph.value_info[:]  # stale types; runtimes and the checker infer them again
        fp16 = sum(self.half)
        return HalfReport(
            fp16_nodes=fp16,
            fp32_nodes=len(self.half) - fp16,
            casts=len(new_nodes),
            clipped_weights=clipped,
        )

    def _convert_constants(self, home: dict[str, int]) -> int:
        """Weights and Constant nodes read only by fp16 nodes become fp16 in place; read by
        both, they get an fp16 twin. Returns how many held values beyond the fp16 range."""
        self._half_copies: dict[str, str] = {}
        clipped = 0
        for name in [*self.initializers, *self.constant_nodes]:
            if self.types.get(name) != FLOAT:
                continue
            readers = [
                self.half[k]
                for k, i in self.consumers.get(name, [])
                if i not in FIXED_FLOAT_INPUTS.get(self.graph.node[k].op_type, frozenset())
            ]
            if not any(readers):
                continue
            tensor = self._tensor_of(name)
            values = numpy_helper.to_array(tensor)
            if np.abs(values).max(initial=0.0) > FP16_MAX:
                clipped += 1
            half = numpy_helper.from_array(
                np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), name
            )
            if all(readers) and not any(o.name == name for o in self.graph.output):
                tensor.CopyFrom(half)
                home[name] = HALF
            else:
                half.name = f"{name}__fp16"
                self.graph.initializer.append(half)
                self._half_copies[name] = half.name
        return clipped

    def _tensor_of(self, name: str) -> TensorProto:
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_nodes[name]
        for a in node.attribute:
            if a.name == "value":
                return a.t
        raise NotImplementedError(f"Constant {name} carries no tensor 'value'")


def _detached(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _toposort(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = defaultdict(list)
    missing = []
    for k, node in enumerate(nodes):
        deps = {i for i in node.input if i not in ready and i in producers}
        missing.append(len(deps))
        for d in deps:
            waiting[d].append(k)
    queue = deque(k for k, m in enumerate(missing) if m == 0)
    order: list[onnx.NodeProto] = []
    while queue:
        k = queue.popleft()
        order.append(nodes[k])
        for o in nodes[k].output:
            for j in waiting.pop(o, []):
                missing[j] -= 1
                if missing[j] == 0:
                    queue.append(j)
    if len(order) != len(nodes):
        raise RuntimeError("fp16 pass produced a graph with a cycle; this is a bug")
    return order
