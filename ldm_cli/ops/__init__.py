"""Layer 1: CPU kernels and memory helpers (Winograd and strip convolutions, narrow and sliced
weights, channels-last, attention slicing, folded upsampling, converted loading, releasing
weights, the allocator).
"""
