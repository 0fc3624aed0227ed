"""The commands' work, one module each: compress, restore, merge, stitch's inputs
(restored deltas), describe (info, verify), merge configs and the demo.
"""
