"""tf_medseg.training."""
