"""clipworld: a procedural image-caption world, its pretraining corpus and its group tasks.

- :mod:`.vocab`: the attribute values (shapes, colours, scenes, sizes, positions, marker);
- :mod:`.render`: one image from attribute values;
- :mod:`.captions`: compositional captions naming a random subset of the attributes;
- :mod:`.pretrain`: the pretraining attribute distribution and its planted co-occurrences;
- :mod:`.tasks`: the group tasks and presets of ``robust/clipworld``;
- :mod:`.geometry`: the zero-shot geometry figures of a model in the world;
- :mod:`.plugin`: the dataset's registration.

The model ``crp-world`` (``--pretrained clipworld``) is pretrained on this corpus by
``scripts/train_world_clip.py``; see docs/datasets.md ("The CLIP-like world").
"""
