"""tf_medseg.cache."""
