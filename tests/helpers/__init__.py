"""Fixture builders shared by several test modules: data sets in the real formats."""
