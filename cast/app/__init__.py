"""The application around the library: training, evaluation, results, W&B, reports."""
