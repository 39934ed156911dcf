"""KN: Knowledge Neurons (Dai et al. 2022)."""

from .attribution import integrated_gradients, neuron_activations
from .hparams import KNHyperparams
from .method import KN, attribution_prompts, locate_knowledge_neurons
from .neurons import coarse_neurons, shared_neurons
from .value_slots import rank_one_factors, value_slot_update

__all__ = [
    "KN",
    "KNHyperparams",
    "attribution_prompts",
    "coarse_neurons",
    "integrated_gradients",
    "locate_knowledge_neurons",
    "neuron_activations",
    "rank_one_factors",
    "shared_neurons",
    "value_slot_update",
]
