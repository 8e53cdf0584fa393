""" Training seams: the co-training task (timm's `TrainingTask`) and its data- / member-parallel drivers """
from .cotraining import CoTrainingTask, is_splitnet, validate_members
