""" Training: the co-training task (timm's `TrainingTask`), its member-parallel variant, and the run drivers """
from .cotraining import CoTrainingTask, is_splitnet, validate_members
from .distributed import DataParallelTraining, MemberParallelTraining
from .member_parallel import MemberParallelTask
