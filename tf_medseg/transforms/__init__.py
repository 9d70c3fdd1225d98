"""tf_medseg.transforms."""
