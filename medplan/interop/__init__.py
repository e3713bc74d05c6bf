"""Interoperability with nnU-Net v2 (issue 15).

* :mod:`medplan.interop.nnunet`: a planned medplan dataset written as an nnU-Net v2 raw
  dataset (the kept cases, duplicates left out) plus ``splits_final.json`` holding medplan's
  folds, where nnU-Net reads it; the ``nnunet`` importer (:mod:`medplan.datasets.nnunet`)
  reads such datasets back.
* :mod:`medplan.interop.postprocessing`: nnU-Net's "keep the largest connected component"
  rule applied to a label map, and ``postprocessing.json`` read back; deciding it on the
  cross-validation folds is :mod:`medplan.evaluation.postprocessing`.

Submodules are imported by name (``from medplan.interop.nnunet import export_nnunet``), so
importing this package stays cheap.
"""
