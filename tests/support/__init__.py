"""Shared machinery of the test suite and the reliability campaign (:mod:`tests.support.campaign`).

* :mod:`.models` -- real safetensors checkpoints built in a folder, small models and fine-tunes.
* :mod:`.zoo` -- a model, fine-tunes and deltas using every dtype class and every codec.
* :mod:`.images` -- delta files taken apart and resealed with fresh checksums.
* :mod:`.damage` -- damaged and hostile files (cases).
* :mod:`.reference` -- an independent reader written from docs/format.md alone.
* :mod:`.outcomes` -- every operation on a case, classified against the reference.
* :mod:`.memory` -- peak memory of operations, in a capped subprocess.
* :mod:`.processes` -- the command line in forked children, killed or held at chosen steps.
"""
