"""Planning a run for the data and the machine.

- :mod:`tf_medseg.planning.fingerprint`: the data (shapes, spacings, foreground, classes).
- :mod:`tf_medseg.planning.system`: the machine (cores, instruction sets, RAM, GPUs).
- :mod:`tf_medseg.planning.rules`: the rules that turn both into a plan (``tf-medseg-plan``).
- :mod:`tf_medseg.planning.plan`: the plan as data (typed settings and their reasons), its
  ``plan.json`` and flagfile, and what a resumed run keeps of it.
"""
