"""PIAA client: the versioned API contract, the feature space, and (soon) the Python client."""

from piaa_client.features import FEATURE_SPACE_VERSION

__all__ = ["FEATURE_SPACE_VERSION"]
