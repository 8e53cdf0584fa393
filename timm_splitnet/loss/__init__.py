""" Co-training losses of SplitNet """
from .cotraining import COT_LOSSES, CoTrainingLoss, CoTrainingLossOutput, js_divergence, pairwise_kl
