"""The values of the package's choice flags, named once.

The configuration checks them (:meth:`tf_medseg.config.TrainConfig.validate`) and the
parts that act on them refuse anything else; both read them here. No TensorFlow, so the CLIs
can check a command line before importing it.
"""

#: Global mixed-precision policies (``--precision``).
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
#: Learning-rate schedules (``--lr_schedule``; :class:`tf_medseg.optim.WarmupSchedule`).
SCHEDULES = ("constant", "cosine", "plateau")
#: Multi-worker backends (``--distribution``; :func:`tf_medseg.distributed.setup`).
BACKENDS = ("auto", "horovod", "tf", "none")
#: When training scores the validation cases in their own geometry (``--val_native``).
NATIVE_VALIDATION = ("best", "every", "off")
#: Training caches (``--cache``; :func:`tf_medseg.cache.sources.make_source`).
CACHE_MODES = ("smart", "full", "none")
