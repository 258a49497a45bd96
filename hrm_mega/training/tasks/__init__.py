"""The training tasks (training/task.py): one file each; the registry is training/task.py TASKS."""
