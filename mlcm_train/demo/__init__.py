"""The embedded demo: a tiny SD1.5-architecture teacher on coloured digits, distilled and measured on CPU.

``python -m mlcm_train demo`` (see ``run.py``) distills an MLCM LoRA from the shipped teacher through the same
``train_distill()`` a user runs on SDXL, then writes a report folder with a sample grid, a quality-vs-steps plot and
its table.
"""
