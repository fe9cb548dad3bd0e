"""Models: the seed's case-study CNN, its LeNet-style ``Net``, torchvision ResNets with a CIFAR stem, and the
LightningModule."""

from lightning_distnn.models.classifier import ImageClassifier
from lightning_distnn.models.mobilenet import mobilenet_v2_cpu
from lightning_distnn.models.networks import CaseStudyCNN, SeedNet, count_parameters
from lightning_distnn.models.resnet import cifar_resnet, resnet18_cifar
from lightning_distnn.models.split import SplitClassifier

MODELS = {"case_study_cnn": CaseStudyCNN, "seed_net": SeedNet, "resnet18_cifar": resnet18_cifar, "mobilenet_v2_cpu": mobilenet_v2_cpu}

__all__ = ["CaseStudyCNN", "SeedNet", "ImageClassifier", "SplitClassifier", "count_parameters", "MODELS", "cifar_resnet",
           "mobilenet_v2_cpu", "resnet18_cifar"]
