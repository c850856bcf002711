"""The on-disk forms of the stages' outputs, one owner each.

* :mod:`fadrm.formats.shards`: the container of every stage's output (an Arrow IPC file, or
  JSON, with a sha256 sidecar that marks it complete and that readers verify) and the
  image rows (uint8 pixels, label, image id) of the select and recover stages.
* :mod:`fadrm.formats.labels`: the relabel stage's rows (views plus soft or hard labels),
  their writers and :class:`~fadrm.formats.labels.LabelRows`, the one reader the student
  uses for soft and hard labels alike.

A new label format goes into ``labels`` (schema, writer and the reader's targets), so
that relabel writes it and the student reads it without other changes.
"""
