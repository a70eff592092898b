"""Training checkpoints: the format (`format.py`), reading and consolidating them without DeepSpeed or a process
group (`read.py`: export and evaluation), and saving and resuming them through DeepSpeed's engine
(`save_load.py`)."""
