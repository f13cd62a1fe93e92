"""The two backends that run an `Edit`: TransformerLens hook points (`tl`) and raw HF hooks (`hf`).

They are mirror images: the same functions (`hook_names`, `hooks`, `run`), the same arguments, the
same errors for the same bad input. `tl_patching.forward.Forward` binds a model to one of them.
"""
