from cast.models.classifier import LRAClassifier

__all__ = ["LRAClassifier"]
