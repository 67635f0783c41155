"""Integrations of sae_fast with training frameworks (verl)."""
