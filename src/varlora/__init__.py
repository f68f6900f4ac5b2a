"""varlora: variational LoRA fine-tuning of causal LMs with the IVON optimizer.

Reference: Cong et al., "Variational Low-Rank Adaptation Using IVON" (2024);
Shen et al., "Variational Learning is Effective for Large Deep Networks" (ICML 2024).

``varlora.load(run_dir)`` restores a finished run for prediction (:mod:`varlora.predictor`).
"""

from varlora.optim import IVON
from varlora.predictor import ExamplePrediction, Predictor, load

__all__ = ["IVON", "ExamplePrediction", "Predictor", "load"]
__version__ = "0.1.0"
