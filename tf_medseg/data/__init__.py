"""The data layer: MSD task folders, NIfTI I/O, dataset statistics and synthetic tasks."""

from tf_medseg.data.io import DataError, Volume, read_nifti, write_nifti
from tf_medseg.data.msd import MSDTask, load_task, split_items, task_split

__all__ = [
    "DataError",
    "MSDTask",
    "Volume",
    "load_task",
    "read_nifti",
    "split_items",
    "task_split",
    "write_nifti",
]
