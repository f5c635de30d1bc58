"""sana: Sana text-to-image models (Linear DiT, DC-AE, Gemma text path), written from the paper's math.

Importing the package is cheap and has no side effects; heavy modules load on first use.
"""

__version__ = "0.1.0"
