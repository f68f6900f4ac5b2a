"""varlora: variational LoRA fine-tuning of causal LMs with the IVON optimizer.

Reference: Cong et al., "Variational Low-Rank Adaptation Using IVON" (2024);
Shen et al., "Variational Learning is Effective for Large Deep Networks" (ICML 2024).
"""

from varlora.optim import IVON

__all__ = ["IVON"]
__version__ = "0.1.0"
