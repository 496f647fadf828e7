"""Layer 4: how a loaded model runs: compilation, offloading, DeepCache, token merging, step
previews, several processes.
"""
