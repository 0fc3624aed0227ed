"""Localization: which positions of a fine-tune carry its skill.

* :mod:`.topk` -- dataless: exact global (or per-tensor) top-k of |tau|, streaming.
* :mod:`.trained` -- data-driven: masks learned on a few examples (needs torch).
"""
