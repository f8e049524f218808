"""The image encoder run by another CPU runtime: OpenVINO or ONNX Runtime (optional installs).

The encoder is ~90% of a propagation's time on a CPU, and both runtimes run LiteMedSAM's TinyViT
encoder faster than torch on the CPUs measured (docs/performance.md, "Speed settings"). Each takes the plain
model (the checkpoint's own modules, before :func:`~.optimize.optimize_for_inference`), converts
it once and keeps the converted file on disk, so later sessions load it in about a second:

- **OpenVINO** (``pip install openvino``): the encoder traced by torch and converted by
  ``openvino.convert_model``, saved as OpenVINO IR (``.xml`` + ``.bin``, float32 weights).
  ``precision="f32"`` computes in float32 (embeddings equal torch's to ~1e-5); ``"bf16"`` lets
  OpenVINO compute in bfloat16 where the CPU has it natively (AVX512-BF16, AMX): faster, and the
  masks move (measured in docs/performance.md).
- **ONNX Runtime** (``pip install onnxruntime onnx``): the encoder exported by
  ``torch.onnx.export`` (the TorchScript exporter, which needs the ``onnx`` package), float32.

:class:`RuntimeEncoder` is an ``nn.Module`` with the encoder's contract (``Bx3xSxS`` float in
``[0, 1]`` -> ``Bx256x64x64``), so it replaces ``model.image_encoder`` and the
:class:`~.predictor.Predictor` runs unchanged. Converted files live in
:func:`exported_dir` (``<weights dir>/exported`` unless ``MEDSAM_SLICER_EXPORT_DIR`` is set), named by a hash of the weights file,
the model, torch's version and the runtime.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..errors import MedSAMError
from .speed import runtime_missing

PRECISIONS = ("f32", "bf16")
#: Bump when the conversion changes, so old files on users' disks are not reused.
FORMAT_VERSION = 1


EXPORT_DIR_ENV = "MEDSAM_SLICER_EXPORT_DIR"


def exported_dir() -> Path:
    """Where converted encoders are kept: ``$MEDSAM_SLICER_EXPORT_DIR`` or ``<weights dir>/exported``."""
    from .registry import weights_dir

    value = os.environ.get(EXPORT_DIR_ENV)
    return Path(value).expanduser() if value else weights_dir() / "exported"


def _file_stem(model_key: str, input_size: int, runtime: str) -> str:
    digest = hashlib.blake2b(digest_size=10)
    digest.update(f"{model_key}|{input_size}|{torch.__version__}|{runtime}|{FORMAT_VERSION}".encode())
    return f"encoder-{runtime}-{digest.hexdigest()}"


def _example(encoder: nn.Module, input_size: int) -> torch.Tensor:
    device = next(encoder.parameters()).device
    return torch.rand(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)).to(device)


def _trace(encoder: nn.Module, input_size: int) -> torch.jit.ScriptModule:
    """The plain encoder traced for conversion (no autograd; shape checks become constants)."""
    example = _example(encoder, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about what is intended here
        # check_trace=False: the attention-bias cache makes a second trace differ, harmlessly.
        return torch.jit.trace(encoder.eval(), example, check_trace=False)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary name in the same folder, so a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def openvino_model_file(encoder: nn.Module, model_key: str, input_size: int, folder: Optional[Path] = None) -> Path:
    """The plain ``encoder`` as OpenVINO IR (``.xml``; its ``.bin`` beside it), converted once."""
    import openvino as ov

    folder = Path(folder) if folder is not None else exported_dir()
    xml = folder / (_file_stem(model_key, input_size, "openvino") + ".xml")
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(_trace(encoder, input_size), example_input=_example(encoder, input_size),
                                     input=[(-1, 3, input_size, input_size)])
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".convert-") as tmp:
        # compress_to_fp16=False: the default would round the weights to float16.
        ov.save_model(converted, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(tmp) / "model.bin", xml.with_suffix(".bin"))
        os.replace(Path(tmp) / "model.xml", xml)  # last: an .xml on disk means the pair is complete
    return xml


def onnx_model_file(encoder: nn.Module, model_key: str, input_size: int, folder: Optional[Path] = None) -> Path:
    """The plain ``encoder`` as an ONNX file (dynamic batch), exported once."""
    folder = Path(folder) if folder is not None else exported_dir()
    path = folder / (_file_stem(model_key, input_size, "onnxruntime") + ".onnx")
    if path.is_file():
        return path

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder.eval(), (_example(encoder, input_size),), str(tmp), dynamo=False,
                              opset_version=17, input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})

    _atomic(path, write)
    return path


class RuntimeEncoder(nn.Module):
    """An image encoder run by OpenVINO or ONNX Runtime on the CPU.

    Args:
        encoder: the plain (not optimised) image encoder with its weights.
        model_key: identifies the weights (names the converted file).
        input_size: the model's square input side ``S``.
        runtime: ``"openvino"`` or ``"onnxruntime"``.
        precision: ``"f32"``, or ``"bf16"`` (OpenVINO only: bfloat16 where the CPU has it).
        threads: compute threads (default: torch's, so one setting governs both).
        folder: where converted files are kept (default :func:`exported_dir`).

    ``forward``: ``Bx3xSxS`` float tensor -> ``Bx256x64x64`` float32 tensor on the CPU.
    """

    def __init__(self, encoder: nn.Module, model_key: str, input_size: int, runtime: str = "openvino",
                 precision: str = "f32", threads: Optional[int] = None, folder: Optional[Path] = None) -> None:
        super().__init__()
        missing = runtime_missing(runtime)
        if missing:
            raise MedSAMError(f"the {runtime} encoder cannot be used: {missing}")
        if precision not in PRECISIONS or (runtime != "openvino" and precision != "f32"):
            raise MedSAMError(f"precision '{precision}' is not available with {runtime}")
        self.runtime = runtime
        self.precision = precision
        self.input_size = int(input_size)
        threads = int(threads or torch.get_num_threads())
        if runtime == "openvino":
            import openvino as ov

            self.file = openvino_model_file(encoder, model_key, input_size, folder)
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": precision}
            compiled = ov.Core().compile_model(str(self.file), "CPU", config)
            self._run = lambda x: compiled(x)[0]
        else:
            import onnxruntime as ort

            self.file = onnx_model_file(encoder, model_key, input_size, folder)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run(None, {"images": x})[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self._run(x), dtype=np.float32))

    def describe(self) -> str:
        """E.g. ``"OpenVINO 2026.4 (f32)"``."""
        if self.runtime == "openvino":
            import openvino as ov

            return f"OpenVINO {ov.__version__.split('-')[0]} ({self.precision})"
        import onnxruntime as ort

        return f"ONNX Runtime {ort.__version__} ({self.precision})"
