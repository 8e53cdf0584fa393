""" Training: the co-training task (timm's `TrainingTask`), its member-parallel variant, the run drivers and the
position inside an epoch """
from .cotraining import CoTrainingTask, is_splitnet, validate_members
from .distributed import DataParallelTraining, MemberParallelTraining
from .member_parallel import MemberParallelTask
from .progress import EpochProgress, NonFiniteLoss, nonfinite_buffers, nonfinite_ranks, skip_nonfinite_step
