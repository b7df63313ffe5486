"""Adapters that put mempool inside engines we did not write.

* :mod:`mempool.integrations.transformers`: a Hugging Face ``Cache`` over MemPool blocks and a
  prefix-caching wrapper around ``model.generate`` (extra ``hf``: ``pip install mempool[hf]``).
"""
