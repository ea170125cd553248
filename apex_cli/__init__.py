"""apex: one-step generators from text-to-image flow models (APEX, condition-shift self-adversarial distillation)."""

__version__ = "0.1.0"
