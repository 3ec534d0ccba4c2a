from training.model.config import ModelConfig

__all__ = ["ModelConfig"]
