"""The speed and memory benchmark: layers and models against sequence length, fidelity, peers."""
