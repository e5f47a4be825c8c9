"""The photo→Monet generator as an MLflow model: `mlflow.pyfunc.load_model(...)` and
`mlflow models serve` turn a uint8 N×256×256×3 photo batch into uint8 N×256×256×3 paintings.

`tracking.log_generator_model` logs this file as the model's code (MLflow's models from code: no
pickle), the generator file the train stage wrote as its artifact, and this package's sources
beside it, so the model loads wherever torch and mlflow are installed, with no params.yaml.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

IMAGE_SIZE = 256  # what the competition takes and what generate writes


class PhotoToMonet(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        with _logged_package(Path(context.artifacts["generator"])):
            from pipeline import generator_file
            from pipeline.runtime import autocast, autocast_dtype, pick_device
        self.translate = generator_file.translate
        self.device = pick_device("auto")
        self.net, self.config = generator_file.load(context.artifacts["generator"], self.device)
        # the `precision` param it was trained with, resolved here as `generate` resolves it (bf16
        # where the device runs it fast): the same paintings as the pipeline's. Models logged
        # before it was recorded ran in fp32
        precision = (context.model_config or {}).get("precision", "fp32")
        self.autocast = autocast(self.device, autocast_dtype(precision, self.device))

    # The np.ndarray hint tells MLflow the input is an array whose schema it cannot infer from the
    # hint: it then uses the signature below and does not warn "Add type hints to `predict`" (a
    # warning no filter of ours can silence: MLflow shows its UserWarnings once, whatever the filters).
    def predict(self, context, model_input: np.ndarray, params=None):
        photos = np.asarray(model_input)
        # MLflow checks the input against the signature first; this is for a caller of the Python
        # model itself (`unwrap_python_model()`)
        if photos.dtype != np.uint8 or photos.ndim != 4 or photos.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"photo2monet takes uint8 N×{IMAGE_SIZE}×{IMAGE_SIZE}×3 photos, "
                             f"got {photos.dtype} {tuple(photos.shape)}")
        paintings = self.translate(self.net, torch.from_numpy(_writable(photos)), self.config["image_size"],
                                   self.device, self.autocast, out_size=IMAGE_SIZE)
        return paintings.numpy()


def _is_ours(module_name: str) -> bool:
    return module_name == "pipeline" or module_name.startswith("pipeline.")


@contextlib.contextmanager
def _logged_package(artifact: Path):
    """Import `pipeline` from the copy logged with the model (`code/` beside its MLmodel file),
    whatever the process imported under that name before: a module of its own called pipeline, or
    this repository's checkout, which MLflow's place for the copy at the front of sys.path does not
    displace. They are set aside while the model's modules load and put back after, so the caller's
    imports stay as they were and the model runs the code it was logged with."""
    code = next((folder / "code" for folder in artifact.resolve().parents if (folder / "MLmodel").is_file()), None)
    if code is None or not (code / "pipeline").is_dir():
        yield  # not a logged model's layout (loaded in place): the package as imported
        return
    theirs = {name: module for name, module in sys.modules.items() if _is_ours(name)}
    for name in theirs:
        del sys.modules[name]
    sys.path.insert(0, str(code))
    try:
        yield
    finally:
        sys.path.remove(str(code))
        for name in [name for name in sys.modules if _is_ours(name)]:
            del sys.modules[name]
        sys.modules.update(theirs)


def _writable(photos: np.ndarray) -> np.ndarray:
    """The photos as torch takes them without a warning: contiguous, and writable (a photo read with
    `np.asarray(PIL.Image.open(...))` is read-only); copied only when they are not."""
    return np.require(photos, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    batch = TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE, 3), name=None)
    return ModelSignature(inputs=Schema([batch]), outputs=Schema([batch]))


mlflow.models.set_model(PhotoToMonet())  # what MLflow loads when it runs this file as the model's code
