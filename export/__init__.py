"""torch -> ONNX export: one checked ONNX file per component plus ``manifest.json``.

Importing this package imports torch and onnx; the runtime never imports it.
"""

from adadiff.export.onnx_export import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS
from adadiff.export.pipeline import HALF_COMPONENTS, ExportOptions, export_onnx

__all__ = [
    "DEFAULT_EXPORTER",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "HALF_COMPONENTS",
    "ExportOptions",
    "export_onnx",
]
