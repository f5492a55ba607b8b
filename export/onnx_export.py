"""torch -> raw ONNX for one component, with the tile batch (and the decoder's h/w) dynamic.

Two exporters are supported and recorded in the manifest:

- ``dynamo`` (default): ``torch.export`` + onnxscript, torch's default since 2.9. It exports the
  diffusers UNet with a dynamic batch and a [B] float timestep, writes one external-data file
  for a large model and already folds most constants (935 nodes for the tiny UNet against 2201).
- ``torchscript``: the legacy tracer, about twice as fast to export but deprecated by torch and
  slated for removal; kept as a fallback for models ``torch.export`` cannot capture.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from adadiff.errors import ConfigError
from adadiff.specs import ModelSpec

log = logging.getLogger("adadiff.export")

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSET = 20
# LayerNormalization needs 17 (older opsets would decompose it); onnxscript's converter writes
# 18 or later whatever it is asked for, so dynamo starts there.
MIN_OPSET = {"dynamo": 18, "torchscript": 17}
MAX_OPSET = {"dynamo": 23, "torchscript": 20}
# torch.export specialises sizes 0 and 1, so tracing at B=1 would freeze the batch.
TRACE_BATCH = 2


def check_exporter(exporter: str, opset: int) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    low, top = MIN_OPSET[exporter], MAX_OPSET[exporter]
    if not low <= opset <= top:
        raise ConfigError(
            f"opset {opset} is outside what the {exporter} exporter writes ({low}..{top}); "
            f"use --opset {DEFAULT_OPSET}"
        )


def trace_inputs(spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    feeds = spec.sample_inputs(TRACE_BATCH, seed=0)
    return tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)


def _dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, object]]:
    # Dim.DYNAMIC lets torch.export narrow a range where model code branches on a size (diffusers'
    # Upsample2D tests batch >= 64 for a torch kernel workaround) instead of failing; the ONNX
    # graph keeps no such bound, and clean-up checks every symbolic axis stayed symbolic.
    return {
        t.name: {i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)}
        for t in spec.inputs
    }


def export_raw(
    module: nn.Module, spec: ModelSpec, path: Path, *, exporter: str, opset: int
) -> Path:
    """Write ``path`` (weights may sit beside it as external data); return the ONNX file."""
    check_exporter(exporter, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = trace_inputs(spec)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Both exporters warn about every Python branch on a tensor size in diffusers; the
        # clean-up's checks and the parity check are what tell whether the graph is right.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                module,
                args,
                None,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=_dynamic_shapes(spec),
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            if program is None:
                raise ConfigError(f"torch.onnx.export gave no program for {spec.name}")
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    written = file_opset(path)
    if written != opset:  # the manifest records the opset asked for: it must be the file's
        raise ConfigError(
            f"the {exporter} exporter wrote {spec.name} at opset {written}, not the {opset} "
            f"asked for; use --opset {written}"
        )
    log.info("%s: %s exporter wrote %s", spec.name, exporter, path)
    return path


def file_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file declares (its weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
