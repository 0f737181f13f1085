"""Supernet training and candidate evaluation on proxy data (`hwnas supernet train`)."""

from hwnas.train.evaluate import SupernetScorer, train_standalone
from hwnas.train.supernet import Supernet, load_supernet, proxy_arch
from hwnas.train.trainer import SupernetTrainer, TrainConfig

__all__ = ["Supernet", "SupernetScorer", "SupernetTrainer", "TrainConfig", "load_supernet",
           "proxy_arch", "train_standalone"]
