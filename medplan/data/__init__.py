"""Training data: the plan's augmentation (batched torch ops) and the loaders that feed it."""
from medplan.data.augmentation import AugmentParams, BatchAugmenter, build_augmentation
from medplan.data.loader import TrainLoader, batch_generator, epoch_order, iterate_validation

__all__ = ["AugmentParams", "BatchAugmenter", "build_augmentation", "TrainLoader",
           "batch_generator", "epoch_order", "iterate_validation"]
