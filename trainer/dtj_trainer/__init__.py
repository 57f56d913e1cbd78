"""The gossip trainer: what each worker pod runs.

Import-light on purpose: `dtj_trainer.config` is pure pydantic and is shared
with the operator, so nothing here imports torch at package import time.
"""
