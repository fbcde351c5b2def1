"""fedlora.kernels: Triton kernels and their plain-torch twins.

No nn, no federated logic, and no import-time side effects: this folder is also
importable as a top-level ``kernels`` from a checkout's root, where transformers
may import it while probing for the Hugging Face package of that name.
"""
