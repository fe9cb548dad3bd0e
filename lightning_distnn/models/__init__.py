"""Models: the seed's case-study CNN, its LeNet-style ``Net`` and the LightningModule."""

from lightning_distnn.models.classifier import ImageClassifier
from lightning_distnn.models.networks import CaseStudyCNN, SeedNet, count_parameters
from lightning_distnn.models.split import SplitClassifier

MODELS = {"case_study_cnn": CaseStudyCNN, "seed_net": SeedNet}

__all__ = ["CaseStudyCNN", "SeedNet", "ImageClassifier", "SplitClassifier", "count_parameters", "MODELS"]
