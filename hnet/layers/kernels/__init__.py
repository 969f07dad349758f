"""The numerical kernels under the layers, apart from the layers' parameters and caches: causal
attention within documents (attention: plain, blockwise with its own backward, Pallas) and the
SSD recurrence of Mamba2 (ssd: the chunked scan and the one-position step). Pure functions of
arrays; they import nothing from hnet."""
