"""Every installed method's conformance battery on the modern architectures ``common_structures`` maps.

The classic seven run in each plugin's own session and in ``test_installed_plugins.py``; this adds the LLaMA family
(grouped-query attention, gated feed-forward, RMSNorm, sliding windows, soft-capping), GPT-J and mT5, with each
method's defaults and no ``modified_modules``.
"""

from opendelta.testing import DeltaMethodSuite
from opendelta.testing.tiny_models import MODERN_ARCHITECTURES, VISION_SPEECH_ARCHITECTURES


class TestEveryMethodOnModernArchitectures(DeltaMethodSuite):
    method_name = None  # parametrized over list_methods() by opendelta.testing.fixtures
    architectures = MODERN_ARCHITECTURES


class TestEveryMethodOnVisionAndSpeech(DeltaMethodSuite):
    """Models that read images or audio: no tokens to put a soft prompt in front of (core places it in front of their
    encoders' first blocks instead)."""

    method_name = None
    architectures = VISION_SPEECH_ARCHITECTURES
