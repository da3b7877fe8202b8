"""Imported first by every benchmark script, before anything that imports ``copy``.

``python bench/X.py`` puts ``bench/`` first on ``sys.path``, where ``bench/copy.py`` (a name the
issue fixes) would shadow the standard library's ``copy`` module for every later import. This
moves ``bench/`` to the end of the path (the scripts still import each other) and puts the
project root first, so ``engine`` imports from this checkout.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path[:] = [os.path.dirname(_here), *_rest, _here]
