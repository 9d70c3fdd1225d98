"""tf_medseg.bench."""
