""" Small helpers: safetensors weights and atomic writes, exact-resume training state, parameter / MAC counts,
calibration and ensemble diversity metrics; `benchmarking` (paired timing rounds) is imported on its own """
from .batch import prepare_batch
from .checkpoint import (
    DATA_CONFIG_KEYS, atomic_save, export_model, exportable_model_args, load_safetensors, save_safetensors,
    weights_metadata, with_data_config,
)
from .flops import count_macs, count_params
from .metrics import ENSEMBLE_MANNERS, CalibrationMeter, EnsembleMetrics, ensemble_log_probs, ensemble_manner
from .train_state import CheckpointKeeper, gather_rng_states, get_rng_state, load_checkpoint_file, set_rng_state
