"""Expose each layer's input tensor as an extra graph output, so one run yields them all."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .integer_layers import run_time_quantization
from .layer_scan import Layer


def add_taps(
    model: onnx.ModelProto,
    layers: tuple[Layer, ...],
    scores_name: str,
    also: tuple[tuple[str, np.dtype], ...] = (),
) -> onnx.ModelProto:
    """A copy of `model` whose outputs are the scores, one tap per distinct layer input,
    then the tensors named in `also` (name, dtype).

    A Conv/Gemm/MatMul input has the same element type as its weight, which gives each tap
    its dtype without shape inference.
    """
    with G_LOGGER.suppress(G_LOGGER.ERROR):  # its warnings are about the exporter's names
        graph = gs.import_onnx(model)
        tensors = graph.tensors()
        graph.outputs = [tensors[scores_name]]
        wanted = [(layer.input, layer.input_dtype) for layer in layers] + list(also)
        for layer in layers:  # the scale and zero point of an input quantized at run time
            names = run_time_quantization(layer.input_dequantization)
            wanted += zip(names, (np.float32, layer.input_dtype))
        for name, dtype in wanted:
            tap = tensors[name]
            if tap not in graph.outputs:
                if tap.dtype is None:
                    tap.dtype = dtype
                graph.outputs.append(tap)
        tapped = gs.export_onnx(graph, do_type_check=False)
    tapped.ir_version = model.ir_version
    del tapped.opset_import[:]
    tapped.opset_import.extend(model.opset_import)
    return tapped
