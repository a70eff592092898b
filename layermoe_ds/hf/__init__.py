"""Hugging Face model directories in and out: loading and checking them (`load.py`), reading and writing their
safetensors tensor by tensor (`files.py`), building a model on meta and reading its tensors into place
(`materialize.py`), and `load_model` for every source a verb accepts (`sources.py`)."""
