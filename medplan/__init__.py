"""medplan: a self-configuring plan-and-train pipeline for 2D medical image segmentation."""

__version__ = "0.1.0"
