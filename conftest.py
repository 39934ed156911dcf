"""Test-suite wide settings: no stray installed plugins unless a test asks (see kedit_core.plugins)."""

import os

os.environ.setdefault("KEDIT_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
