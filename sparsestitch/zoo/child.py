"""``python -m sparsestitch.zoo.child``: one local zoo worker (see :func:`.jobs.run_local`).

Reads a JSON request ``{"zoo": ..., "task": ...}`` on stdin, adds that member, and prints
one marked JSON result line.  Nothing imports this module, so running it with ``-m`` does
not import it twice.
"""

from sparsestitch.zoo.jobs import child_main

if __name__ == "__main__":
    child_main()
