"""lmdm: Live Music Diffusion Models.

The library (this package) is pure PyTorch/NumPy: configs, audio, data, models, diffusion, streaming
engines and checkpoints. Ray jobs live in ``lmdm.pipelines``, evaluation in ``lmdm.eval`` and
serving in ``lmdm.serve``; the library never imports them, nor ray, mlflow, deepspeed or accelerate.
"""

__version__ = "0.1.0"
