"""The delta file: records, reader and writer (the spec is docs/format.md), the codecs,
and the outputs of a compress run.
"""
