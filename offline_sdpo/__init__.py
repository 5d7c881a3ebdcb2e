"""Offline SDPO on logged (x, y, o) interactions: ``offline_sdpo_trainer`` (config, data, collator,
trainer) and ``main_offline_sdpo`` (the command line; ``scripts/train_offline_sdpo.sh`` launches it)."""
