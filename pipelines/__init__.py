"""Entry points: one thin module per stage plus the ``mmcorpus`` CLI."""
