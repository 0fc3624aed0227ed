"""How deltas combine: the merge rules (each one's numpy reference and its torch
form), unions of positions, the combiners that apply a rule to decoded records, in
blocks or whole, on the CPU or a device.
"""
