"""dlearn: the modules behind a textbook on diffusion models that runs.

Chapters import modules by name (`from dlearn import datasets`, then `datasets.digits(...)`).
Importing `dlearn` itself loads nothing heavy: diffusers and transformers are imported only by
the modules that need them.
"""

__version__ = "0.1.0"
