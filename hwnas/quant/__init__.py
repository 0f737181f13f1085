"""Mixed-precision quantisation under a latency budget (`hwnas quantize`, issue 11).

For one fixed candidate (a classifier of a ShuffleNet space, or an FCOS detector), every
*unit* (the stem, each choice block, the classifier head; for a detector also the FPN, the FCOS
head and the fp32-only post-processing) runs in one of the device's precisions. The pieces:

- `units`: the units of a candidate and the activation edges between them, the per-unit
  precision genes (`PrecisionSpace`: an assignment is an `Arch` of it, written ``ffiiiiif…``);
- `latency`: this host's mixed table for one candidate: each unit alone at each precision and
  each *pair* of neighbouring units at each precision pair, all timed interleaved, so a
  boundary's conversion cost (the Q/DQ pair, and whatever onnxruntime's graph rewrites make of
  it) is measured where it happens; calibrated and validated on whole random assignments;
- `sensitivity`: per unit, the Hessian trace (Hutchinson) on real batches, the weight
  perturbation of int8, and the measured metric drop when that unit alone is int8;
- `assign`: the ILP (`scipy.optimize.milp`, HAWQ-V3's objective), greedy and random baselines;
- `realise`: an assignment as an onnxruntime static QDQ model calibrated on real training images;
- `target`: the trained model being quantised (checkpoint, data, metric);
- `cli`: `hwnas quantize`.
"""
