"""tf_medseg.cli."""
