"""earlyprop: early inference in energy-based models approximates back-propagation.

Bengio & Fischer (2015), equilibrium propagation and STDP-like learning, in PyTorch.
See THEORY labels (BF-1 ... BF-17, EP17 eq. N) in the docstrings of each module.
"""

from earlyprop.conv import ConvPool, conv_network
from earlyprop.cost import Cost, CrossEntropyReadout, SquaredError
from earlyprop.dynamics import Diagnostics, DivergenceError, relax, residual
from earlyprop.interactions import Coupling, Dense, Interaction, Lateral
from earlyprop.network import Network
from earlyprop.newton import polish
from earlyprop.nonlinearity import HardSigmoid, Linear, Nonlinearity, Sigmoid, Tanh, get_nonlinearity
from earlyprop.nudge import Nudge

__version__ = "0.1.0"

__all__ = [
    "ConvPool", "Cost", "Coupling", "CrossEntropyReadout", "Dense", "Diagnostics", "DivergenceError", "HardSigmoid",
    "Interaction", "Lateral", "Linear", "Network", "Nonlinearity", "Nudge", "Sigmoid", "SquaredError", "Tanh",
    "conv_network", "get_nonlinearity", "polish", "relax", "residual",
]
