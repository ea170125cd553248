"""Checkpoints shipped inside the package, addressed as ``shipped:<name>`` (``model.init: shipped:NAME``)."""
