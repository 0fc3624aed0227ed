"""The walk over tensors within the memory budget: row blocks, record runs, read-ahead,
spools and the budget itself.
"""
