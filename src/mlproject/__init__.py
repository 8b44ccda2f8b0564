"""mlproject: MLflow-tracked experiments for large language models."""

__version__ = "0.1.0"
