"""adaoptim: fast, torch-exact CPU optimizers on a Rust core.

``adaoptim.torch`` holds drop-in ``torch.optim`` classes (``from adaoptim.torch
import AdamW``). The compiled core is ``adaoptim._core``.
"""

from . import _core

__version__ = "0.1.0"
backend = _core.backend
torch_classes = _core.torch_classes

__all__ = ["backend", "torch_classes", "__version__"]
