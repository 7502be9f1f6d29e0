"""fedcoder: federated fine-tuning of code LLMs with PEFT adapters on Flower."""

__version__ = "0.1.0"
