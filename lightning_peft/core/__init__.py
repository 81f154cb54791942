"""The plain-torch core: layer helpers, ownership declarations, targeting, sharded tensors, virtual tokens.

Nothing here knows about Lightning, files, or any particular method.
"""
