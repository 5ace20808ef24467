"""Reward registry."""
