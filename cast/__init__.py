"""CAST-LRA: efficient attention on the Long Range Arena."""
