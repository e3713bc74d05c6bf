"""A test-only nnU-Net trainer: nnU-Net's own recipe, 1 epoch of 3 iterations (nnU-Net's epochs
have 250), so that a CPU test trains a real nnU-Net fold in seconds. nnU-Net finds it through
``$nnUNet_extTrainer`` pointing at this folder."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_medplanTiny(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 2
