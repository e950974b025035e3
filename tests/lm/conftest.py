"""Generative-model tests run offline: nothing may be downloaded from the Hugging Face hub."""

from __future__ import annotations

import os

# Before transformers is imported anywhere in the session, and inherited by every process tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
