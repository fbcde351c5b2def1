"""fedlora.kernels: Triton kernels and their plain-torch twins.

dispatch     backend choice (Triton / torch twin), the autotune config helper, the one launch path
plan         SegmentPlan: a batch layout turned into kernel metadata, cached per layout
segmented    shrink / expand / outer: the segmented multi-rank LoRA GEMMs (forward and backward)
reconstruct  B diag(c) A for many layers in one launch (the server's aggregated delta)
lowrank      truncated SVD of low-rank sums (plain torch)

No nn, no federated logic, and no import-time side effects: this folder is also
importable as a top-level ``kernels`` from a checkout's root, where transformers
may import it while probing for the Hugging Face package of that name.
"""
