"""Model-preserving compression of torch networks with the interpolative decomposition."""

from ._compressor import NetworkCompressor
from ._io import load_compressed, save_compressed
from ._kinds import register_layer_kind
from ._mha import PrunedMultiheadAttention
from ._objectives import (
    ActivationsObjective,
    Calibration,
    CorrectiveCalibration,
    Objective,
    OriginalCalibration,
    OutputsObjective,
    SequentialCalibration,
    register_calibration,
    register_objective,
)
from ._outputs import ModelOutputs

__all__ = [
    "ActivationsObjective",
    "Calibration",
    "CorrectiveCalibration",
    "ModelOutputs",
    "NetworkCompressor",
    "Objective",
    "OriginalCalibration",
    "OutputsObjective",
    "PrunedMultiheadAttention",
    "SequentialCalibration",
    "load_compressed",
    "register_calibration",
    "register_layer_kind",
    "register_objective",
    "save_compressed",
]
