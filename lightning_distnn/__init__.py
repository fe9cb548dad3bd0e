"""lightning_distnn: distributed neural-network training for PyTorch Lightning.

Importing the package registers the strategy names (``distnn_dp``, ...) with Lightning.
"""

from lightning_distnn import strategies  # noqa: F401  (registers strategy names)
from lightning_distnn.mesh import ParallelDims

__version__ = "0.1.0"
__all__ = ["ParallelDims", "strategies", "__version__"]
