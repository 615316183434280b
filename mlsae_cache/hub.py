"""Fail fast, in one line, when the Hugging Face hub is needed but out of reach."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
"""The settings that each put the Hugging Face libraries offline."""


def offline_settings() -> list[str]:
    """The OFFLINE_VARIABLES set to a true value now."""
    return [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def hub_offline_by_setting() -> bool:
    return bool(offline_settings())


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout_s``.

    Loading libraries retry for tens of seconds before failing; one short connect answers at once.
    """
    if hub_offline_by_setting():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False
