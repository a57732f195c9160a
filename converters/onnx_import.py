"""Import a third-party ONNX classifier: cut it into a backbone file and a float32 head.

The classifier's linear layer is the last ``Gemm``, ``MatMul`` (+ ``Add``) or 1x1 ``Conv`` on a
pooled 1x1 map before an optional tail of Softmax / LogSoftmax / Flatten / Reshape / Squeeze /
Identity / QuantizeLinear / DequantizeLinear. Its weights (initializers, Constant nodes, or
int8/uint8 initializers behind DequantizeLinear) are dequantized into a float32
:class:`~edgeadapt.device.head.Head` (``W``: D x C, ``bias``: C).

The backbone keeps every node the embedding needs and nothing else, and gets the interface
of edgeadapt's own ONNX backbones: input ``"input"`` float32 NHWC (batch, H, W, C) holding
``pixel * scale + offset``; output ``"embedding"`` float32 (batch, D); symbolic batch. Models
that take NCHW input get a Transpose in front; per-channel mean/std normalisation (PyTorch
style) is baked in as Sub/Div nodes; a uint8 model input gets a Cast.

The embedding size must be static: a model whose embedding size depends on the input size
(e.g. Flatten of a dynamic spatial map) is refused with :class:`IncompatibleModelError`.
Only onnx and onnxruntime are needed (no TensorFlow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeadapt.converters.model_info import inspect_onnx
from edgeadapt.converters.tflite_import import ImportedClassifier, ImportOptions, input_spec_from_quantization
from edgeadapt.device.errors import ConversionError, IncompatibleModelError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import pixel_table

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
EMBEDDING_NAME = "embedding"
BATCH_DIMENSION = "batch"
_TAIL_OPERATORS = ("Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze", "Identity", "QuantizeLinear",
                   "DequantizeLinear", "Cast")
_FLOAT, _UINT8, _INT8 = 1, 2, 3


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise ConversionError("importing an ONNX model needs onnx: pip install 'edgeadapt[host]'") from error
    return onnx


def load_onnx_model(content: bytes) -> Any:
    """Parse and check an ONNX model; ConversionError for truncated or invalid files."""
    onnx = _onnx()
    try:
        model = onnx.load_from_string(bytes(content))
    except Exception as error:
        raise ConversionError(f"the file cannot be parsed as ONNX ({error}): it is truncated or another format") from error
    if not model.graph.node or not model.graph.output:
        raise ConversionError("the ONNX file holds no graph (it is truncated or empty)")
    try:
        onnx.checker.check_model(model)
    except Exception as error:
        raise ConversionError(f"the ONNX model is invalid ({str(error).splitlines()[0]}); it may be truncated") from error
    return model


def _dimensions(value: Any) -> list[int | str | None]:
    """Dimensions of a ValueInfo: ints, symbolic names, or None when unknown."""
    if not value.type.tensor_type.HasField("shape"):
        return []
    result: list[int | str | None] = []
    for dimension in value.type.tensor_type.shape.dim:
        if dimension.HasField("dim_value"):
            result.append(int(dimension.dim_value))
        elif dimension.HasField("dim_param"):
            result.append(str(dimension.dim_param))
        else:
            result.append(None)
    return result


class OnnxGraph:
    """Lookup tables over an ONNX graph: producers, constants, shapes."""

    def __init__(self, model: Any):
        onnx = _onnx()
        self.model = model
        self.graph = model.graph
        self.initializers = {initializer.name: initializer for initializer in self.graph.initializer}
        self.producers = {name: node for node in self.graph.node for name in node.output}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception as error:  # shape inference is best effort
            logger.debug("ONNX shape inference failed: %s", error)
            values = list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)
        self.shapes = {value.name: _dimensions(value) for value in values}

    @property
    def inputs(self) -> list[Any]:
        return [value for value in self.graph.input if value.name not in self.initializers]

    def is_constant(self, name: str) -> bool:
        try:
            self.constant(name)
            return True
        except IncompatibleModelError:
            return False

    def constant(self, name: str) -> np.ndarray:
        """The float32 value of a constant tensor (initializer, Constant node, DequantizeLinear/Identity of one)."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        return numpy_helper.to_array(attribute.t)
            if node.op_type in ("Identity", "Cast"):
                return self.constant(node.input[0]).astype(np.float32)
            if node.op_type == "Transpose":
                permutation = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                return np.transpose(self.constant(node.input[0]), permutation)
            if node.op_type == "DequantizeLinear":
                values = self.constant(node.input[0]).astype(np.float64)
                scale = self.constant(node.input[1]).astype(np.float64)
                zero = self.constant(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
                axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
                if np.ndim(scale) == 1 and np.size(scale) > 1:
                    shape = [1] * values.ndim
                    shape[axis] = scale.size
                    scale = scale.reshape(shape)
                    zero = np.reshape(zero, shape) if np.ndim(zero) else zero
                return ((values - zero) * scale).astype(np.float32)
        raise IncompatibleModelError(f"tensor {name!r} is computed at run time; the classifier weights must be constants")


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _locate_head(graph: OnnxGraph) -> tuple[Any, str, Head, list[str]]:
    """(linear node, embedding tensor name, head, tail) or IncompatibleModelError saying what was found."""
    outputs = list(graph.graph.output)
    if len(outputs) != 1:
        names = ", ".join(f"{value.name!r} {_dimensions(value)}" for value in outputs)
        raise IncompatibleModelError(
            f"the model has {len(outputs)} outputs ({names}); an image classifier has one class-score output: "
            "this looks like a detection or multi-task model, which edgeadapt cannot import"
        )
    output = outputs[0].name
    shape = graph.shapes.get(output, [])
    if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]) and shape[2] * shape[3] > 1:
        raise IncompatibleModelError(
            f"the model's output {output!r} has shape {shape}: a per-pixel map (segmentation), not class scores"
        )
    tail: list[str] = []
    current = output
    for _ in range(32):
        node = graph.producers.get(current)
        if node is None:
            raise IncompatibleModelError(f"no classifier head found: the output {output!r} is not computed by a layer")
        kind = node.op_type
        if kind in _TAIL_OPERATORS:
            tail.append(kind)
            current = node.input[0]
            continue
        if kind == "Sigmoid":
            raise IncompatibleModelError("the classifier ends in Sigmoid (multi-label scores); edgeadapt imports "
                                         "single-label classifiers (linear layer + optional Softmax)")
        if kind == "Gemm":
            return (node, *_gemm_head(graph, node), list(reversed(tail)))
        if kind == "Add":
            matmul = next((graph.producers.get(name) for name in node.input
                           if graph.producers.get(name) is not None and graph.producers[name].op_type == "MatMul"), None)
            bias_name = next((name for name in node.input if graph.is_constant(name)), None)
            if matmul is not None and bias_name is not None:
                embedding, head = _matmul_head(graph, matmul, graph.constant(bias_name))
                return node, embedding, head, list(reversed(tail))
        if kind == "MatMul":
            embedding, head = _matmul_head(graph, node, None)
            return node, embedding, head, list(reversed(tail))
        if kind == "Conv":
            embedding, head = _conv_head(graph, node)
            return node, embedding, head, list(reversed(tail))
        chain = " <- ".join([*tail, kind])
        raise IncompatibleModelError(
            f"no classifier head found: the output {output!r} {shape} is produced by {chain}; edgeadapt looks for "
            f"the last Gemm, MatMul(+Add) or 1x1 Conv, followed only by {'/'.join(_TAIL_OPERATORS)}"
        )
    raise IncompatibleModelError("no classifier head found: the output tail is longer than 32 nodes")


def _gemm_head(graph: OnnxGraph, node: Any) -> tuple[str, Head]:
    if _attribute(node, "transA", 0):
        raise IncompatibleModelError("the classifier Gemm transposes its input (transA=1); not a standard linear layer")
    weights = graph.constant(node.input[1]).astype(np.float64)
    if _attribute(node, "transB", 0):
        weights = weights.T
    weights = weights * float(_attribute(node, "alpha", 1.0))
    classes = weights.shape[1]
    if len(node.input) > 2 and node.input[2]:
        bias = np.broadcast_to(graph.constant(node.input[2]).astype(np.float64), (1, classes)).reshape(classes)
        bias = bias * float(_attribute(node, "beta", 1.0))
    else:
        bias = np.zeros(classes)
    return node.input[0], Head(weights=weights.astype(np.float32), bias=bias.astype(np.float32))


def _matmul_head(graph: OnnxGraph, node: Any, bias: np.ndarray | None) -> tuple[str, Head]:
    weight_name = next((name for name in node.input[1:] if graph.is_constant(name)), None)
    if weight_name is None or node.input[0] == weight_name:
        raise IncompatibleModelError("the classifier MatMul has no constant weight matrix as its second input")
    weights = graph.constant(weight_name)
    if weights.ndim != 2:
        raise IncompatibleModelError(f"the classifier MatMul weights have shape {weights.shape}, expected (D, classes)")
    classes = weights.shape[1]
    bias = np.zeros(classes, np.float32) if bias is None else np.broadcast_to(bias, (1, classes)).reshape(classes)
    return node.input[0], Head(weights=weights.astype(np.float32), bias=np.asarray(bias, np.float32))


def _conv_head(graph: OnnxGraph, node: Any) -> tuple[str, Head]:
    weights = graph.constant(node.input[1])
    if weights.ndim != 4 or weights.shape[2:] != (1, 1) or int(_attribute(node, "group", 1)) != 1:
        raise IncompatibleModelError(
            f"no classifier head found: the last layer is a Conv with weights {tuple(weights.shape)}, not a 1x1 classifier"
        )
    input_shape = graph.shapes.get(node.input[0], [])
    if len(input_shape) == 4 and input_shape[2:] != [1, 1]:
        raise IncompatibleModelError(
            f"no classifier head found: the last layer is a 1x1 Conv on a {input_shape[2:]} map, not a pooled 1x1 map"
        )
    classes = weights.shape[0]
    bias = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(classes, np.float32)
    return node.input[0], Head(weights=weights.reshape(classes, -1).T.astype(np.float32), bias=bias.astype(np.float32))


def _layout(dimensions: list[Any]) -> str:
    if len(dimensions) != 4:
        raise IncompatibleModelError(f"the model input has shape {dimensions}; an image classifier takes a 4-D image batch")
    if dimensions[1] in (1, 3) and dimensions[3] not in (1, 3):
        return "NCHW"
    if dimensions[3] in (1, 3):
        return "NHWC"
    if dimensions[1] in (1, 3):
        return "NCHW"
    raise IncompatibleModelError(f"the model input has shape {dimensions}: neither NCHW nor NHWC with 1 or 3 channels")


def import_onnx_classifier(content: bytes, options: ImportOptions = ImportOptions()) -> ImportedClassifier:
    """Split an ONNX classifier into an embedding backbone and a float32 head (see the module doc).

    Args:
        content: The ``.onnx`` file's bytes.
        options: Input normalisation, colour order, resize rule and input size.

    Returns:
        The backbone bytes, the head, the input spec and what was cut.

    Raises:
        ConversionError: Unreadable file.
        IncompatibleModelError: No recognisable classifier head.
    """
    model = load_onnx_model(content)
    graph = OnnxGraph(model)
    image = _image_input(graph, options)
    original_input, dimensions, layout = image.value, image.dimensions, image.layout
    node, embedding, head, tail = _locate_head(graph)
    embedding_shape = _embedding_shape(graph, node, embedding, head)
    spec, source = _input_spec(image, options)
    backbone = _cut(model, graph, embedding, len(embedding_shape), original_input, layout, image.element_type,
                    image.height, image.width, image.channels, options)
    backbone_content = backbone.SerializeToString()
    _check_runs(backbone_content, spec, head.embedding_size)
    described = inspect_onnx(backbone_content)
    output_kind = "probabilities" if "Softmax" in tail else "log_probabilities" if "LogSoftmax" in tail else "logits"
    description = f"{node.op_type} {node.name or node.output[0]!r} ({head.embedding_size} -> {head.num_classes})"
    logger.info("imported ONNX classifier: head %s after %r", description, embedding)
    return ImportedClassifier(
        source_format="onnx",
        backbone=described,
        head=head,
        input_spec=spec,
        head_operator=description,
        tail=tail,
        output_kind=output_kind,
        normalization_source=source + (" + per-channel mean/std" if options.channel_mean is not None else ""),
        details={
            "embedding_tensor": embedding,
            "layout": layout,
            "original_input": {"name": original_input.name, "shape": [str(d) for d in dimensions],
                               "element_type": int(image.element_type)},
            "channel_mean": list(options.channel_mean) if options.channel_mean is not None else None,
            "channel_std": list(options.channel_std) if options.channel_std is not None else None,
            "dropped_nodes": len(model.graph.node) - len(backbone.graph.node),
        },
    )


@dataclass(frozen=True)
class _ImageInput:
    """The model's image input: its ONNX value info, shape, layout, size and element type."""

    value: Any
    dimensions: list[Any]
    layout: str
    channels: int
    height: int
    width: int
    element_type: int


def _image_input(graph: OnnxGraph, options: ImportOptions) -> _ImageInput:
    """The one image input; its size comes from ``options.input_size`` when the model's is dynamic."""
    inputs = graph.inputs
    if len(inputs) != 1:
        raise IncompatibleModelError(f"the model has {len(inputs)} inputs; an image classifier takes one image tensor")
    original_input = inputs[0]
    dimensions = _dimensions(original_input)
    layout = _layout(dimensions)
    channels = dimensions[1] if layout == "NCHW" else dimensions[3]
    spatial = dimensions[2:4] if layout == "NCHW" else dimensions[1:3]
    if not all(isinstance(value, int) for value in spatial):
        if options.input_size is None:
            raise IncompatibleModelError(
                f"the model input {original_input.name!r} has a dynamic size {dimensions}; give the size to use "
                "(input_size=(H, W), CLI --input-size HxW)"
            )
        height, width = (int(value) for value in options.input_size)
    else:
        height, width = int(spatial[0]), int(spatial[1])
    element_type = original_input.type.tensor_type.elem_type
    if element_type not in (_FLOAT, _UINT8):
        raise IncompatibleModelError(f"the model input has ONNX element type {element_type}; edgeadapt supports float and uint8")
    return _ImageInput(original_input, dimensions, layout, int(channels), height, width, element_type)


def _embedding_shape(graph: OnnxGraph, node: Any, embedding: str, head: Head) -> list[Any]:
    """The shape of the classifier's input tensor; it must be fixed and hold ``head.embedding_size`` values."""
    embedding_shape = graph.shapes.get(embedding)
    if not embedding_shape or any(not isinstance(value, int) for value in embedding_shape[1:]):
        raise IncompatibleModelError(
            f"the embedding {embedding!r} (input of the classifier {node.op_type}) has a dynamic or unknown size "
            f"{embedding_shape}; edgeadapt needs a fixed embedding size: export the model with a fixed input size "
            "or global pooling before the classifier"
        )
    size = int(np.prod(embedding_shape[1:]))
    if size != head.embedding_size:
        raise IncompatibleModelError(
            f"the embedding {embedding!r} holds {size} values but the classifier weights expect {head.embedding_size}"
        )
    return embedding_shape


def _input_spec(image: _ImageInput, options: ImportOptions) -> tuple[InputSpec, str]:
    """(input spec, where its normalisation came from): raw pixels for uint8 inputs, else ``options``."""
    channels = image.channels
    if image.element_type == _UINT8:
        spec = InputSpec(height=image.height, width=image.width, channels=channels,
                         color_order="GRAY" if channels == 1 else options.color_order, resize=options.resize, resample=options.resample,
                         scale=1.0, offset=0.0)
        source = "uint8 input (raw pixels)"
    else:
        spec, source = input_spec_from_quantization(image.height, image.width, channels, "float32", 0.0, 0, options)
    if options.channel_mean is not None and len(options.channel_mean) not in (1, channels):
        raise InputError(f"channel_mean has {len(options.channel_mean)} values for {channels} channels")
    return spec, source


def input_adapter_nodes(original_name: str, layout: str, element_type: int, channels: int,
                        options: ImportOptions) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers mapping the NHWC float input "input" to the original model input."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers = [], []
    current = INPUT_NAME
    steps = []
    if options.channel_mean is not None:
        mean = np.resize(np.asarray(options.channel_mean, np.float32), channels)
        std = np.resize(np.asarray(options.channel_std, np.float32), channels)
        initializers += [numpy_helper.from_array(mean, "edgeadapt_channel_mean"),
                         numpy_helper.from_array(std, "edgeadapt_channel_std")]
        steps += [("Sub", ["edgeadapt_channel_mean"], {}), ("Div", ["edgeadapt_channel_std"], {})]
    if layout == "NCHW":
        steps.append(("Transpose", [], {"perm": [0, 3, 1, 2]}))
    if element_type == _UINT8:
        steps.append(("Cast", [], {"to": TensorProto.UINT8}))
    if not steps:
        return [], []
    for position, (kind, extra, attributes) in enumerate(steps):
        output = original_name if position == len(steps) - 1 else f"edgeadapt_input_{position}"
        nodes.append(helper.make_node(kind, [current, *extra], [output], name=f"edgeadapt_input_{kind.lower()}", **attributes))
        current = output
    return nodes, initializers


def _cut(model: Any, graph: OnnxGraph, embedding: str, embedding_rank: int, original_input: Any, layout: str,
         element_type: int, height: int, width: int, channels: int, options: ImportOptions) -> Any:
    from onnx import TensorProto, helper

    needed = {embedding}
    kept = []
    for node in reversed(list(model.graph.node)):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    if original_input.name not in needed:
        raise IncompatibleModelError("the embedding does not depend on the model input; cannot cut this model")
    nodes = [_copy(node) for node in kept]
    adapter_nodes, adapter_initializers = input_adapter_nodes(original_input.name, layout, element_type, channels, options)
    if not adapter_nodes and original_input.name != INPUT_NAME:
        for node in nodes:
            node.input[:] = [INPUT_NAME if name == original_input.name else name for name in node.input]
    if embedding_rank == 2:
        nodes.append(helper.make_node("Identity", [embedding], [EMBEDDING_NAME], name="edgeadapt_embedding"))
    else:
        nodes.append(helper.make_node("Flatten", [embedding], [EMBEDDING_NAME], name="edgeadapt_embedding", axis=1))
    initializers = [initializer for initializer in model.graph.initializer if initializer.name in needed]
    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIMENSION, height, width, channels])
    new_output = helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, [BATCH_DIMENSION, None])
    new_graph = helper.make_graph(adapter_nodes + nodes, "edgeadapt_backbone", [new_input], [new_output],
                                  initializer=adapter_initializers + initializers)
    backbone = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="edgeadapt",
                                 ir_version=model.ir_version)
    for function in model.functions:
        backbone.functions.append(function)
    return backbone


def _copy(node: Any) -> Any:
    from onnx import NodeProto

    copy = NodeProto()
    copy.CopyFrom(node)
    return copy


def _check_runs(content: bytes, spec: InputSpec, embedding_size: int) -> None:
    try:
        import onnxruntime
    except ImportError as error:
        raise ConversionError("checking the ONNX backbone needs onnxruntime: pip install 'edgeadapt[host]'") from error
    try:
        session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
        output = session.run(None, {INPUT_NAME: np.zeros((2, *spec.shape), np.float32)})[0]
    except Exception as error:
        raise ConversionError(
            f"the cut ONNX backbone does not run on a batch of 2 ({str(error).splitlines()[0]}); the model may fix "
            "its batch size to 1: re-export it with a dynamic batch dimension"
        ) from error
    if output.shape != (2, embedding_size):
        raise ConversionError(f"the cut ONNX backbone returns {output.shape}, expected (2, {embedding_size})")


def onnx_scores(content: bytes, images: np.ndarray, spec: InputSpec, options: ImportOptions = ImportOptions()) -> np.ndarray:
    """Run an original ONNX classifier on prepared uint8 images (N, H, W, C); (N, C) float32 scores.

    Normalisation, per-channel mean/std, layout and dtype are applied in numpy, independently
    of the graph adapter that the imported backbone carries.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(bytes(content), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    values = pixel_table(spec)[images]
    if options.channel_mean is not None:
        channels = images.shape[-1]
        values = (values - np.resize(np.asarray(options.channel_mean, np.float32), channels)) / np.resize(
            np.asarray(options.channel_std, np.float32), channels)
    shape = [d if isinstance(d, int) else -1 for d in model_input.shape]
    layout = _layout([d if d != -1 else None for d in shape]) if len(shape) == 4 else "NHWC"
    if layout == "NCHW":
        values = np.transpose(values, (0, 3, 1, 2))
    if model_input.type == "tensor(uint8)":
        values = values.astype(np.uint8)
    fixed_batch = shape[0] == 1
    if fixed_batch:
        rows = [session.run(None, {model_input.name: values[i : i + 1]})[0].reshape(1, -1) for i in range(len(values))]
        return np.concatenate(rows).astype(np.float32)
    return np.asarray(session.run(None, {model_input.name: values})[0], np.float32).reshape(len(values), -1)
