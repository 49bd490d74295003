"""The model zoo: `build_model(name, ...)` and the weights helpers it relies on."""

from models.pretrained import (
    PretrainedWeightsError,
    export_encoder,
    load_encoder_weights,
    read_state_dict,
)
from models.registry import ZOO, ZooEntry, build_model

__all__ = [
    "ZOO",
    "PretrainedWeightsError",
    "ZooEntry",
    "build_model",
    "export_encoder",
    "load_encoder_weights",
    "read_state_dict",
]
