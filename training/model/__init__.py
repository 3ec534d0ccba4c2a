from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.flops import count_parameters, flops_per_token

__all__ = ["BertForPreTraining", "ModelConfig", "count_parameters", "flops_per_token"]
