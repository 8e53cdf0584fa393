""" Small helpers: safetensors weights and atomic writes, exact-resume training state, parameter / MAC counts """
from .checkpoint import atomic_save, export_model, load_safetensors, save_safetensors, weights_metadata
from .flops import count_macs, count_params
from .train_state import CheckpointKeeper, gather_rng_states, get_rng_state, load_checkpoint_file, set_rng_state
