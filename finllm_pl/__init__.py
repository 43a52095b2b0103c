"""finllm_pl: QLoRA instruction tuning of causal LMs for financial sentiment, driven by Lightning."""

__version__ = "0.1.0"
