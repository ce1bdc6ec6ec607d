"""calm-rt: the CalM calcium-imaging foundation model, live at the microscope.

The data's way through the package::

    calm_rt.data      sessions, readers, causal preprocessing, simulator
    calm_rt.cli       the ``calm-rt`` command

See the README for the commands and DESIGN.md for the contract.
"""

from calm_rt.errors import CalmError, ConfigError, DataError, NotAvailableError, ProtocolError

__version__ = "0.1.0"

__all__ = [
    "CalmError",
    "ConfigError",
    "DataError",
    "NotAvailableError",
    "ProtocolError",
    "__version__",
]
