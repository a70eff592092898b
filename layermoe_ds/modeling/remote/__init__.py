"""Modeling code that travels with an exported LayerMoE model (loaded through `trust_remote_code=True`).

These files import only torch and transformers, and each other relatively, so an exported directory loads on a
machine without DeepSpeed or layermoe_ds.
"""
