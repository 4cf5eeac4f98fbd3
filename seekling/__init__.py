"""seekling: the DeepSeek-V3/R1 recipe at small scale.

The model core (`seekling.model`), its configuration (`seekling.config`), the fast sampler
(`seekling.generate`) and the Hugging Face format (`seekling.checkpoint`) are the foundation the
trainers, evaluators and the server stand on.
"""

__version__ = "0.1.0"
