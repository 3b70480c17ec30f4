"""Video data: shards (``tools/make_shards.py``), TSN sampling, augmentation, and two loader backends.

    from claver_dist.data.loader import build_loader      # CPU (PyAV) or DALI batches, resumable
    from claver_dist.data.augment import build_mixup      # mixup/cutmix/label smoothing on a batch

Nothing is imported here so that ``claver_dist.config`` (which needs only
``data.config``) stays light; see docs/data.md for the whole picture.
"""
