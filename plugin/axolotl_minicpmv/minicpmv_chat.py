"""`type: axolotl_minicpmv.minicpmv_chat` in an Axolotl config names this module; the strategy lives in
`integration.prompt_strategy`."""

from .integration.prompt_strategy import load

__all__ = ["load"]
