"""The DeepSpeed boundary: everything that knows DeepSpeed's module tree, file names or internals. Outside this
package the project speaks of experts by id and of tensors by their names on disk (`names.py`)."""
