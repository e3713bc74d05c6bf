"""Small fake datasets written exactly in the official download layouts, with learnable structures.

Tests and the demo use these instead of real data (which never ships), so the real importers
are what gets exercised. Every writer returns the folder a user would pass to
``medplan_convert``. The truth (class maps, lossless images, planted duplicates) is kept
*outside* that folder, in ``<parent>/.synthetic_truth/<folder name>/``, and read back with
:func:`truth_labels`, :func:`truth_images`, :func:`planted_duplicates`.

Structures, all drawn with vectorised numpy (no per-pixel Python):

* CAMUS: an ultrasound sector (apex at the top centre, black outside) filled with speckle;
  a dark LV cavity (1) inside a bright myocardium ring open at the base (2) and a dark atrium
  below it (3). Geometry is random per patient and view; ES has a smaller cavity, a thicker
  wall and a larger atrium. Each frame also gets its own smooth tissue-echogenicity field, so
  that distinct frames are never perceptual-hash near-duplicates of each other.
* ISIC 2018: skin-coloured RGB with a darker irregular lesion (1), optional hairs.
* NeoPolyp: pink mucosa with folds and 1-3 polyps, non-neoplastic (1, pale, smooth, green in
  the mask) or neoplastic (2, red, pitted texture, red in the mask); masks are colour JPEGs.
* Kvasir-SEG / CVC-ClinicDB: the same polyps, binary masks. BUSI: gray ultrasound with
  hypoechoic lesions, several mask files for some images, ``normal`` images with empty masks.

Planted duplicates (``duplicates=True``): an exact byte copy, a re-encoded copy (JPEG
quality 95 round trip) and a brightened copy (+8 intensity), each under a new case name with
its ground truth.
"""
from __future__ import annotations

from medplan.datasets.synthetic.busi import write_busi
from medplan.datasets.synthetic.camus import INSTANTS, VIEWS, write_camus
from medplan.datasets.synthetic.common import (BRIGHTEN, DEFAULT_SIZES, DUPLICATE_KINDS, MIN_PHASH_DISTANCE, TRUTH_DIR,
                                               manifest, planted_duplicates, truth_images, truth_labels)
from medplan.datasets.synthetic.isic import write_isic2018
from medplan.datasets.synthetic.polyp import write_cvc, write_kvasir, write_neopolyp

__all__ = ["BRIGHTEN", "DEFAULT_SIZES", "DUPLICATE_KINDS", "INSTANTS", "MIN_PHASH_DISTANCE", "TRUTH_DIR", "VIEWS",
           "manifest", "planted_duplicates", "truth_images", "truth_labels", "write_busi", "write_camus", "write_cvc",
           "write_isic2018", "write_kvasir", "write_neopolyp"]
