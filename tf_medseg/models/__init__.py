"""tf_medseg.models."""
