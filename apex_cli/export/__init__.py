"""`apex sample` and `apex export`: images for people, and files other tools load without hand-editing.

Modules::

    loading.py              what --ckpt names (run, checkpoint, shipped:<name>, export) and the sampler record
    samples.py              apex sample: PNGs, grid, manifest
    writer.py               apex export: diffusers / lora / merged, each checked by a round trip before it appears
    files.py                a folder written atomically (temporary sibling, rename)
    pipeline_apex_shapes.py the diffusers pipeline class copied into every diffusers export (imports no apex)
    scheduling_apex.py      the APEX sampler as a diffusers scheduler, copied likewise
"""
