"""Bridges to third-party MAE implementations (HF transformers)."""
